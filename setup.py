"""The compiled helpers (native/): everything else about the package is in pyproject.toml.

Optional: where gcc or the Python headers are missing the build goes on without them, and
hostd/fastcopy.py, hostd/core/slots.py and hostd/desk.py use their pure-Python twins.
"""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra"]


def native(name: str, *, threads: bool = False) -> Extension:
    """hostd._NAME from native/NAME.c; `threads`: it starts pthreads of its own."""
    return Extension(
        f"hostd._{name}",
        sources=[f"native/{name}.c"],
        extra_compile_args=CFLAGS,
        extra_link_args=["-pthread"] if threads else [],
        optional=True,
    )


setup(ext_modules=[native("fastcopy", threads=True), native("slots"), native("desk", threads=True)])
