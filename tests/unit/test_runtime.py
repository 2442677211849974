from __future__ import annotations

import time

from services.runtime import Tombstones


def test_tombstones_remember_aborts_for_their_ttl() -> None:
    tombs = Tombstones(ttl_s=0.2)
    tombs.add("r1")
    assert "r1" in tombs and "r2" not in tombs and 5 not in tombs
    time.sleep(0.25)
    assert "r1" not in tombs


def test_tombstones_stay_bounded() -> None:
    tombs = Tombstones(ttl_s=0.0)
    for i in range(5000):
        tombs.add(f"r{i}")
    assert len(tombs._ids) <= 1026
