"""Whether this machine can build what `torch.compile` builds at run time.

On CUDA, Inductor's kernels are Triton kernels, and Triton builds each kernel's launcher (and, once, its driver's
helpers) as a small Python extension with the system's C compiler: it needs a C compiler (`CC`, else gcc or clang
on the PATH, as `triton.runtime.build` looks for one) and Python's headers (`Python.h`; the python3-dev package).
On the CPU, Inductor writes C++ and builds it with a C++ compiler (`CXX`, else g++ or clang++) against the same
headers. Slim images (CUDA's runtime images, python:*-slim) have neither: there the compile would fail at the
warm-up with "Failed to find C compiler". Checked at start instead, so that auto leaves the compile off and an
explicit `--compile` is refused with what to install."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path


def install_hint(device: str) -> str:
    """What to install on Debian or Ubuntu for `compile_toolchain_missing(device)` to find nothing missing."""
    packages = "gcc libc6-dev python3-dev" if device == "cuda" else "g++ python3-dev"
    return f"install a {'C' if device == 'cuda' else 'C++'} compiler and Python's headers (apt install {packages})"


def lacking(device: str, missing: str) -> str:
    """Why a compile asked for on `device` is refused, `missing` being `compile_toolchain_missing(device)`."""
    return f"needs what this machine lacks: {missing}; {install_hint(device)}"


def compile_toolchain_missing(device: str) -> str:
    """What `torch.compile` on `device` ("cuda" or "cpu") needs and this machine lacks, in words ("" for nothing)."""
    missing = []
    if device == "cuda":
        if importlib.util.find_spec("triton") is None:
            missing.append("Triton (the triton package)")
        if _compiler("CC", ("gcc", "clang")) is None:
            missing.append("a C compiler (CC, gcc or clang) for Triton's kernel launchers")
    elif _compiler("CXX", ("g++", "clang++")) is None:
        missing.append("a C++ compiler (CXX, g++ or clang++) for Inductor's CPU kernels")
    headers = python_headers()
    if not (headers / "Python.h").is_file():
        missing.append(f"Python's headers ({headers}/Python.h)")
    return "; ".join(missing)


def _compiler(variable: str, names: tuple[str, ...]) -> str | None:
    """The compiler the builders would use: the environment variable's (taken as given, as they do), else the first
    of `names` on the PATH."""
    given = os.environ.get(variable)
    if given:
        return given
    return next((found for name in names if (found := shutil.which(name)) is not None), None)


def python_headers() -> Path:
    """Where the builders look for `Python.h` (Triton's scheme: Debian's posix_local is read as posix_prefix)."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return Path(sysconfig.get_paths(scheme=scheme)["include"])
