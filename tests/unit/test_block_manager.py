from __future__ import annotations

import pytest

from common.block_manager import BlockManager
from common.errors import NoFreeBlocksError


def test_allocate_append_free_hand_out_exact_blocks() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate("a", 5) == [0, 1]
    assert bm.allocate("b", 4) == [2]
    assert bm.slot("a", 4) == 1 * 4 + 0
    assert bm.slots("a", 2, 6) == [2, 3, 4, 5]
    assert bm.append("a", 8) == []  # still fits in block 1
    assert bm.append("a", 9) == [3]
    assert bm.block_table("a") == [0, 1, 3]
    assert bm.num_free_blocks == 2
    assert bm.free("a") == 3
    assert bm.free("a") == 0  # idempotent
    # freed blocks go to the back of the free list, in reverse table order
    assert bm.allocate("c", 12) == [4, 5, 3]
    bm.check_integrity()


def test_running_out_is_a_refusal_that_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    bm.allocate("a", 4)
    with pytest.raises(NoFreeBlocksError) as err:
        bm.allocate("b", 3)
    assert (err.value.needed, err.value.free) == (2, 1)
    assert "b" not in bm
    with pytest.raises(NoFreeBlocksError):
        bm.append("a", 7)
    assert bm.block_table("a") == [0, 1]
    assert bm.num_tokens("a") == 4
    assert bm.num_free_blocks == 1
    assert not bm.can_allocate(3)
    assert bm.can_append("a", 6)
    bm.check_integrity()


def test_fork_shares_blocks_until_the_last_owner_frees() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("parent", 3)
    assert bm.fork("parent", "child") == [0, 1]
    assert bm.free("parent") == 0
    assert bm.num_free_blocks == 2
    bm.check_integrity()
    assert bm.free("child") == 2
    assert bm.num_free_blocks == 4
    bm.check_integrity()


def test_integrity_check_catches_corruption() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm._free.append(0)  # a block both used and free
    with pytest.raises(RuntimeError, match=r"free list holds a block twice|block 0"):
        bm.check_integrity()


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [("num_blocks", {"num_blocks": 0, "block_size": 4}), ("block_size", {"num_blocks": 4, "block_size": 0})],
)
def test_bad_sizes_are_refused(field: str, kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match=field):
        BlockManager(**kwargs)


def test_misuse_is_refused() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate("a", 2)
    with pytest.raises(ValueError, match="positive"):
        bm.allocate("b", 0)
    with pytest.raises(ValueError, match="shrink"):
        bm.append("a", 1)
