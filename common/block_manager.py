"""Which KV blocks each sequence owns: pure Python, no tensors.

The pool of tensors (`common.kv_pool`) is indexed by the ids handed out here; this module
only keeps the books. Every operation either succeeds whole or raises `NoFreeBlocksError`
having changed nothing, so a caller can always refuse, queue or preempt cleanly.

    block table of a sequence with block_size 4 and 10 tokens:
        [ 7 | 2 | 9 ]      token t lives in block table[t // 4] at offset t % 4
          0-3 4-7 8,9      (the last block has 2 free slots before a new block is needed)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable

from common.errors import NoFreeBlocksError

Owner = Hashable


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[Owner, list[int]] = {}
        self._num_tokens: dict[Owner, int] = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) <= len(self._free)

    def owners(self) -> list[Owner]:
        return list(self._tables)

    def __contains__(self, owner: Owner) -> bool:
        return owner in self._tables

    def block_table(self, owner: Owner) -> list[int]:
        return self._tables[owner]

    def num_tokens(self, owner: Owner) -> int:
        return self._num_tokens[owner]

    def slot(self, owner: Owner, position: int) -> int:
        """Cache slot of token `position` of `owner`: block id * block_size + offset."""
        table = self._tables[owner]
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, owner: Owner, start: int, end: int) -> list[int]:
        """Slots of tokens `start .. end-1`, in order."""
        table, bs = self._tables[owner], self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    # ---- changes -------------------------------------------------------------------------
    def allocate(self, owner: Owner, num_tokens: int) -> list[int]:
        """Give a new owner room for `num_tokens` tokens; returns its block table."""
        if owner in self._tables:
            raise ValueError(f"{owner!r} already holds KV blocks")
        if num_tokens <= 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
        blocks = self._take(self.blocks_for(num_tokens))
        self._tables[owner] = blocks
        self._num_tokens[owner] = num_tokens
        return blocks

    def append(self, owner: Owner, num_tokens: int) -> list[int]:
        """Grow `owner` to hold `num_tokens` tokens in all; returns only the blocks it gained."""
        current = self._num_tokens[owner]
        if num_tokens < current:
            raise ValueError(f"{owner!r} holds {current} tokens; cannot shrink to {num_tokens}")
        table = self._tables[owner]
        gained = self._take(self.blocks_for(num_tokens) - len(table))
        table.extend(gained)
        self._num_tokens[owner] = num_tokens
        return gained

    def can_append(self, owner: Owner, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(self._tables[owner]) <= len(self._free)

    def fork(self, parent: Owner, child: Owner) -> list[int]:
        """Let `child` share all of `parent`'s blocks (reference counted), e.g. for n > 1 samples.

        Shared blocks are read-only by convention: the caller must copy the last, partly filled
        block before either owner writes into it.
        """
        if child in self._tables:
            raise ValueError(f"{child!r} already holds KV blocks")
        table = list(self._tables[parent])
        for block in table:
            self._ref_counts[block] += 1
        self._tables[child] = table
        self._num_tokens[child] = self._num_tokens[parent]
        return table

    def free(self, owner: Owner) -> int:
        """Release `owner`'s blocks; returns how many went back to the free list. Idempotent."""
        table = self._tables.pop(owner, None)
        self._num_tokens.pop(owner, None)
        if table is None:
            return 0
        released = 0
        for block in reversed(table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
                released += 1
        return released

    def _take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise NoFreeBlocksError(needed=count, free=len(self._free))
        blocks = [self._free.popleft() for _ in range(count)]
        for block in blocks:
            self._ref_counts[block] = 1
        return blocks

    # ---- invariants ----------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise `RuntimeError` naming the first broken invariant; cheap enough to run when idle.

        Invariants: the free list has no duplicates; a block is free exactly when no table
        names it; each block's reference count equals the number of tables naming it; each
        table is exactly as long as its token count needs.
        """
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeError("free list holds a block twice")
        counts = [0] * self.num_blocks
        for owner, table in self._tables.items():
            if len(table) != self.blocks_for(self._num_tokens[owner]):
                raise RuntimeError(f"{owner!r}: {len(table)} blocks for {self._num_tokens[owner]} tokens")
            for block in table:
                counts[block] += 1
        for block in range(self.num_blocks):
            if counts[block] != self._ref_counts[block]:
                raise RuntimeError(f"block {block}: ref count {self._ref_counts[block]}, named {counts[block]} times")
            if (counts[block] == 0) != (block in free):
                raise RuntimeError(f"block {block}: free={block in free} but named {counts[block]} times")
