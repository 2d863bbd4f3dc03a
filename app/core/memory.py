"""Giving memory back: after a burst (glibc's heap), and after an accelerator out-of-memory (torch's cache).

Decoding a large image allocates tens of MB in one go; glibc keeps freed heap memory in per-thread arenas for
reuse, so after a burst of big requests the process's resident size stays near its peak for ever. Two settings
bound that: fewer arenas (M_ARENA_MAX; the default is 8 per core, one more for each thread that allocates
concurrently) and, after a request that decoded many pixels, malloc_trim(0) to hand the free pages back to the
kernel. Neither has a Python binding, hence ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)
M_ARENA_MAX = -8  # from glibc's malloc.h

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _libc.malloc_trim  # noqa: B018 (musl has no malloc_trim: then leave memory alone)
        _libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        _libc = None


def limit_arenas(arenas: int) -> None:
    if _libc is not None and arenas > 0 and _libc.mallopt(M_ARENA_MAX, arenas) != 1:
        logger.warning("mallopt(M_ARENA_MAX, %d) was refused", arenas)


def give_back() -> None:
    """Return free heap pages to the kernel (a few ms; call after a request that decoded many pixels)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def free_accelerator_memory() -> None:
    """After a CUDA out-of-memory: drop the failed request's tensors (a collection) and hand the caching
    allocator's free blocks back, so the requests that follow find the memory. A no-op without CUDA."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
