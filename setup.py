"""The compiled helpers (native/): everything else about the package is in pyproject.toml.

Optional: where gcc or the Python headers are missing the build goes on without them, and
hostd/fastcopy.py, hostd/core/slots.py and hostd/desk.py use their pure-Python twins.
"""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra"]

setup(
    ext_modules=[
        Extension(
            "hostd._fastcopy",
            sources=["native/fastcopy.c"],
            extra_compile_args=CFLAGS,
            extra_link_args=["-pthread"],
            optional=True,
        ),
        Extension(
            "hostd._slots",
            sources=["native/slots.c"],
            extra_compile_args=CFLAGS,
            optional=True,
        ),
        Extension(
            "hostd._desk",
            sources=["native/desk.c"],
            extra_compile_args=CFLAGS,
            extra_link_args=["-pthread"],
            optional=True,
        ),
    ]
)
