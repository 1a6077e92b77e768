"""Give memory that the process freed back to the operating system (glibc's ``malloc_trim``).

After a large transient allocation (checkpoint loading, calibration buffers) glibc keeps the
freed pages of its heap mapped; they still count in the RSS and the next large allocation
(e.g. the staging copies of a checkpoint save) lands on top of them. ``trim_heap`` returns them.
A no-op where the C library has no ``malloc_trim`` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


def trim_heap() -> bool:
    """Release the free pages of the C heap; True if anything was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
