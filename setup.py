"""The compiled helper (native/): everything else about the package is in pyproject.toml.

Optional: where gcc or the Python headers are missing the build goes on without it, and
hostd/fastcopy.py uses its pure-Python twin.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hostd._fastcopy",
            sources=["native/fastcopy.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
