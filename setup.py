"""Builds the pybind11 in-process C++ host; everything else is in pyproject.toml."""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup

ext_modules = []
import os  # noqa: E402

if os.path.exists("runtimes/cpp/_host.cpp"):
    ext_modules.append(
        Pybind11Extension(
            "runtimes.cpp._host",
            ["runtimes/cpp/_host.cpp"],
            include_dirs=["runtimes/cpp/include"],
            libraries=["dl"],
            cxx_std=17,
            extra_compile_args=["-O2"],
        )
    )

setup(ext_modules=ext_modules)
