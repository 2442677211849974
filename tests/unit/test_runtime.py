from __future__ import annotations

import time

from services.runtime import Tombstones


def test_tombstones_remember_aborts_for_their_ttl() -> None:
    tombs = Tombstones(ttl_s=60.0)
    start = time.monotonic()
    tombs.add("r1", now=start)
    assert "r1" in tombs and "r2" not in tombs and 5 not in tombs
    tombs.add("r2", now=start + 61.0)  # r1 has expired: dropped as r2 comes
    assert len(tombs) == 1


def test_tombstones_stay_bounded_and_each_abort_is_cheap() -> None:
    tombs = Tombstones(ttl_s=3600.0, max_ids=1000)
    for i in range(50_000):  # an abort storm, all within the TTL
        tombs.add(f"r{i}")
    assert len(tombs) == 1000
    assert "r49999" in tombs and "r48999" not in tombs  # the oldest went first
    tombs.add("r49999")  # a repeated abort refreshes, never duplicates
    assert len(tombs) == 1000
