"""The KV tensors: per layer a K and a V pool of `[num_blocks, block_size, num_kv_heads, head_dim]`.

Sized from a byte budget so an operator (or a test) caps a decode instance's capacity in the
unit that matters on a GPU: bytes of HBM.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from common import hugepages


@dataclass(frozen=True)
class KVLayout:
    """The shape of one model's paged KV, independent of how many blocks there are."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @cached_property
    def bytes_per_block(self) -> int:
        """K and V of every layer for one block."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    @cached_property
    def bytes_per_token(self) -> int:
        return self.bytes_per_block // self.block_size

    def blocks_for_budget(self, budget_bytes: int) -> int:
        """How many blocks fit in `budget_bytes`; at least one block must fit."""
        num_blocks = budget_bytes // self.bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes={budget_bytes} holds no block: one block of {self.block_size} tokens "
                f"takes {self.bytes_per_block} bytes"
            )
        return num_blocks


class KVPool:
    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        # on huge pages on a CPU: blocks are read in scattered pieces (common/hugepages.py)
        self.k = [hugepages.zeros(shape, layout.dtype, device) for _ in range(layout.num_layers)]
        self.v = [hugepages.zeros(shape, layout.dtype, device) for _ in range(layout.num_layers)]

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block
