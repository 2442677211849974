"""CPU tensors backed by transparent huge pages: KV pools and model weights.

A decode step reads each sequence's KV blocks wherever they sit in a pool of hundreds of MiB, and
streams every weight of the model. With 4 KiB pages that is a TLB miss every few cache lines,
and in a virtual machine each miss walks two page tables. Measured here (docs/engine.md): the
paged attention kernel over blocks in random order ran at 11-12 GB/s on 4 KiB pages and at
14.6-14.8 GB/s on 2 MiB pages; the linear kernel over 370 MB of weights at 20-21 against 25-29
GB/s. Linux backs an anonymous mapping with huge pages when THP is `always`, or when it is
`madvise` (Debian's default) and the mapping asks with madvise(MADV_HUGEPAGE) before it is first
touched. So the memory is a fresh anonymous mapping of our own (never a reused, already touched
piece of the malloc heap), advised, then touched. Anywhere else (another OS, THP `never`, a
refused advice, no huge page free) the tensor is on ordinary pages: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 * HUGE_PAGE  # below this the rounding costs more than the pages save
_ALIGN = 64  # each parameter in `rehome` starts on a cache line


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(shape), on huge pages where the device is the CPU and the OS grants them.

    The mapping is one huge page longer than the tensor, so the tensor can start on a huge-page
    boundary; the tensor keeps the mapping alive (torch.frombuffer holds it)."""
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
    if device.type != "cpu" or advice is None or nbytes < MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    # private and anonymous (a shared one would be shmem, which THP leaves alone): zero, untouched
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    with contextlib.suppress(OSError):  # refused (THP compiled out, a sandbox): ordinary pages
        region.madvise(advice, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    tensor = raw[offset : offset + nbytes].view(dtype).view(shape)
    tensor.zero_()  # fault every page in now, not during the first steps that use them
    return tensor


def rehome(module: nn.Module) -> None:
    """Move a CPU module's parameters, values kept, into one region on huge pages (tied
    parameters stay tied: `parameters()` yields each once). Nothing moves when they are too few
    bytes to fill a huge page or two, or not on the CPU."""
    params = [p for p in module.parameters() if p.device.type == "cpu"]
    sizes = [-(-p.numel() * p.element_size() // _ALIGN) * _ALIGN for p in params]
    if sum(sizes) < MIN_BYTES:
        return
    arena = zeros((sum(sizes),), torch.uint8, torch.device("cpu"))
    offset = 0
    for param, size in zip(params, sizes, strict=True):
        nbytes = param.numel() * param.element_size()
        home = arena[offset : offset + nbytes].view(param.dtype).view(param.shape)
        home.copy_(param.data)
        param.data = home
        offset += size
