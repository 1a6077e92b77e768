"""Source-file corpora: Python's standard library (a second domain every machine has) and globs.

``python-stdlib`` is the ``.py`` source under ``sysconfig.get_paths()["stdlib"]``, one document
per file, in sorted relative-path order. Left out: test suites (directories ``test``, ``tests``,
``idle_test``, files ``test_*.py``), installed packages (``site-packages``, ``dist-packages``),
generated tables (``encodings`` codec maps, ``pydoc_data``, ``_sysconfigdata*``, any file whose
leading comments say it is generated) and files over 256 KiB.

The split is by file and depends only on the file's relative path: a file is held out when the
first 8 hex digits of the SHA-256 of its POSIX relative path are 0 modulo 10 (about 10 %), so
the split is the same on every machine and does not shift when a file is added elsewhere.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sysconfig
from pathlib import Path

STDLIB = "python-stdlib"
FILE_SPLITS = ("train", "heldout", "all")
HELDOUT_EVERY = 10
MAX_FILE_BYTES = 256 * 1024
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__", "encodings", "pydoc_data"})
_GENERATED = re.compile(r"(?im)^\s*#.*\b(auto-?generated|generated (from|by)|do not edit)")
_MAGIC = re.compile(r"[*?\[]")


def split_of(relative_path: str) -> str:
    """``"heldout"`` or ``"train"`` for a file's POSIX relative path (see module docstring)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).hexdigest()
    return "heldout" if int(digest[:8], 16) % HELDOUT_EVERY == 0 else "train"


def stdlib_root() -> Path:
    """The standard library directory of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def _keep_stdlib_file(path: Path) -> bool:
    name = path.name
    if name.startswith("test_") or name.startswith("_sysconfigdata"):
        return False
    if path.stat().st_size > MAX_FILE_BYTES:
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return _GENERATED.search(f.read(1000)) is None


def stdlib_files() -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the kept standard-library files, sorted by relative path."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} is missing; use "
                                f"--input 'DIR/**/*.py' with a source tree")
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS and not d.startswith("config-")]
        for name in names:
            path = Path(directory) / name
            if name.endswith(".py") and path.is_file() and _keep_stdlib_file(path):
                files.append((path.relative_to(root).as_posix(), path))
    return sorted(files)


def glob_files(pattern: str) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the files a glob matches (``**`` recursive), sorted.

    Paths are relative to the pattern's leading directories without wildcards, so the by-file
    split of a tree does not depend on where the tree lives.
    """
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _MAGIC.search(part):
            break
        fixed.append(part)
    base = Path(*fixed) if fixed else Path(".")
    files = sorted((Path(p).relative_to(base).as_posix(), Path(p))
                   for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(f"--input {pattern!r} matches no files; check the directory and quote "
                         f"the pattern (e.g. 'DIR/**/*.py') so the shell does not expand it")
    return files


def is_glob(spec: str) -> bool:
    """Whether an input spec is a glob pattern (has ``*``, ``?`` or ``[``)."""
    return _MAGIC.search(spec) is not None


def file_documents(spec: str, split: str) -> list[str]:
    """The text of each file of ``spec`` (``python-stdlib`` or a glob) in ``split``."""
    if split not in FILE_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {FILE_SPLITS}")
    files = stdlib_files() if spec == STDLIB else glob_files(spec)
    chosen = [path for rel, path in files if split == "all" or split_of(rel) == split]
    if not chosen:
        raise ValueError(f"{spec} has no files in the {split} split ({len(files)} files in all); "
                         f"use --split all or more files")
    return [path.read_text(encoding="utf-8", errors="replace") for path in chosen]
