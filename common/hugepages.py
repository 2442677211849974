"""CPU tensors backed by transparent huge pages, for memory read in scattered pieces.

A decode step reads each sequence's KV blocks wherever they sit in a pool of hundreds of MiB.
With 4 KiB pages nearly every block costs TLB misses, and in a virtual machine each miss walks
two page tables: measured here, the paged attention kernel over blocks in random order ran at
11-12 GB/s on 4 KiB pages and at 14.6-14.8 GB/s (the copy bandwidth) on 2 MiB pages
(docs/engine.md). Linux gives an anonymous mapping huge pages when THP is `always`, or when it
is `madvise` (Debian's default) and the mapping asks with madvise(MADV_HUGEPAGE), which is what
this does before the memory is first touched. Anywhere else (another OS, THP `never`, a refused
madvise) the tensor is an ordinary one: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable
from functools import cache

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h>, Linux
MIN_BYTES = 4 * HUGE_PAGE  # below this the rounding costs more than the pages save


@cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    advise: Callable[[int, int, int], int] = madvise
    return advise


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape), on huge pages where the device is the CPU and the OS grants them.

    The storage is over-allocated by one huge page so the tensor can start on a huge-page
    boundary; the returned view keeps that storage alive."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for size in shape:
        numel *= size
    madvise = _madvise()
    if device.type != "cpu" or madvise is None or numel * itemsize < MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = torch.empty(numel * itemsize + HUGE_PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    body = raw[offset : offset + numel * itemsize]
    madvise(body.data_ptr(), numel * itemsize // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)  # refused: small pages
    tensor = body.view(dtype).view(shape)
    tensor.zero_()  # the first touch, after the advice, is what faults the huge pages in
    return tensor
