"""Keep freed memory from piling up in the process (glibc's allocator).

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
buffers of tens of MiB — one row's logits, a chunk of weights — come from heap arenas that are
rarely handed back, one arena per thread. A quantization run allocates such buffers over and over,
and its peak RSS then grows with the number of rows it scores. Fixing the threshold at 1 MiB makes
large buffers their own mappings, returned to the system when freed; two arenas are plenty for the
few threads torch and ggml run here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 1 << 20


@cache
def bound_heap_growth() -> bool:
    """Apply the settings above once per process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, 4 * MMAP_THRESHOLD)
                and mallopt(M_ARENA_MAX, 2))
