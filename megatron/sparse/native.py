"""Build a C source of ``csrc/`` into a shared library on first use, cached, loaded with ctypes.

The build takes about a second and is cached like the embedded data (:mod:`megatron.sparse.cache`),
keyed by the source, the compiler and this CPU's instruction set (libraries are built with
``-march=native``, so a home directory shared by different nodes gets one build per CPU kind).
Callers (:mod:`megatron.sparse.cpu_kernels`, :mod:`megatron.sparse.inference.cpu_kernel`) turn a
:class:`BuildError` into one warning and their PyTorch fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable

from megatron.sparse import cache

CSRC = Path(__file__).with_name("csrc")
# Tried in order; later entries drop what some compilers lack (-march=native, OpenMP).
FLAG_SETS = (
    ["-O3", "-march=native", "-ffast-math", "-fopenmp"],
    ["-O3", "-ffast-math", "-fopenmp"],
    ["-O3", "-ffast-math"],
)


class BuildError(OSError):
    """No compiler, or none of the flag sets compiled the source (the message says why)."""


def cpu_signature() -> str:
    """The instruction-set flags of this CPU (Linux), else the platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _compile(compiler: str, source: Path, lib: Path, flag_sets) -> None:
    """Compile with the first flag set that works (``-ffast-math`` only at compile time: linked
    into a shared library it would switch the whole process to flush-to-zero)."""
    errors = []
    for flags in flag_sets:
        obj = lib.with_suffix(".o")
        openmp = [f for f in flags if f == "-fopenmp"]
        steps = ([compiler, *flags, "-fPIC", "-c", str(source), "-o", str(obj)],
                 [compiler, "-shared", *openmp, str(obj), "-o", str(lib), "-lm"])
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-300:]}")
                break
        else:
            return
    raise BuildError("; ".join(errors))


def build_library(source: Path, *, cache_name: str, flag_sets=FLAG_SETS) -> ctypes.CDLL:
    """Compile ``source`` (cached under ``cache_name``) and load it; :class:`BuildError` if the
    compiler (``$CC``, else ``cc``/``gcc``) is missing or fails."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise BuildError("no C compiler found (set CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, repr(flag_sets),
                                    platform.machine(), cpu_signature()]).encode()).hexdigest()
    name = f"lib{source.stem}.so"
    entry = cache.cached_entry(cache_name, key[:16],
                               lambda d: _compile(compiler, source, d / name, flag_sets))
    if entry is None:  # cache not writable: build privately for this process
        entry = Path(tempfile.mkdtemp(prefix=f"megatron-sparse-{cache_name}-"))
        _compile(compiler, source, entry / name, flag_sets)
    try:
        return ctypes.CDLL(str(entry / name))
    except OSError as err:
        raise BuildError(str(err)) from None


def load_kernel(source: Path, *, cache_name: str, env_switch: str,
                bind: Callable[[ctypes.CDLL], ctypes.CDLL], what: str,
                fallback: str) -> ctypes.CDLL | None:
    """The bound library built from ``source``, or None for the caller's fallback path.

    None when ``$env_switch`` is ``torch``, or when the build fails: then one warning says
    ``could not build the {what} (<why>); {fallback}``.
    """
    if os.environ.get(env_switch, "auto") == "torch":
        return None
    try:
        return bind(build_library(source, cache_name=cache_name))
    except BuildError as err:
        warnings.warn(f"could not build the {what} ({err}); {fallback}", stacklevel=3)
        return None
