"""On-disk cache for derived data of the embedded default (tokenizer, cleaned corpus).

Reading the tokenizer out of the GGUF file takes ~18 s and cleaning the Wikipedia dump ~8 s, in
every process that needs them; the derived files load in well under a second. The cache lives in
``$MEGATRON_SPARSE_CACHE`` (default ``~/.cache/megatron-sparse``); entries are keyed by the
source file's size and modification time and by library versions, written under a temporary name
and renamed, and silently skipped when the directory is not writable. Delete it at any time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    """``$MEGATRON_SPARSE_CACHE`` or ``~/.cache/megatron-sparse``."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "megatron-sparse"
    return Path(os.environ.get("MEGATRON_SPARSE_CACHE", default))


def source_key(path: Path, *versions: str) -> str:
    """A key that changes when ``path`` or any of ``versions`` changes."""
    stat = path.stat()
    return "-".join([str(stat.st_size), str(stat.st_mtime_ns), *versions]).replace(os.sep, "_")


def cached_entry(name: str, key: str, build: Callable[[Path], None]) -> Path | None:
    """The directory ``<cache>/<name>-<key>``, built by ``build(tmp_dir)`` on first use.

    Returns ``None`` when the cache cannot be written (the caller then works uncached).
    """
    root = cache_root()
    target = root / f"{name}-{key}"
    if target.is_dir():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    except OSError:
        return None
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:  # another process finished first, or the disk is read-only/full
        shutil.rmtree(tmp, ignore_errors=True)
        return target if target.is_dir() else None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
