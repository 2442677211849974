"""`Hearing.silent`: who is judged gone, after we heard well and just after we recovered."""

from __future__ import annotations

import time
from typing import Any, cast

from common.bus import Bus
from common.liveness import RECOVERY_GRACE, Hearing


def _hearing(recovered_ago: float, dead_after_s: float = 1.0) -> tuple[Hearing, float]:
    """A hearing that began hearing well `recovered_ago` seconds before the returned `now`."""
    hearing = Hearing(cast(Bus, cast(Any, object())), "test", dead_after_s, tick_s=dead_after_s / 4)
    now = time.monotonic()
    hearing._hearing_since = now - recovered_ago
    return hearing, now


def test_no_one_is_judged_before_we_have_heard_well_for_dead_after() -> None:
    hearing, now = _hearing(recovered_ago=0.5, dead_after_s=60.0)
    assert not hearing.judging
    assert not hearing.silent(now - 100.0, now)


def test_a_peer_heard_since_we_recovered_is_judged_by_dead_after_once_the_grace_is_over() -> None:
    hearing, now = _hearing(recovered_ago=1.5)
    # heard 0.3 s after our recovery (a heartbeat it queued during the pause), silent 1.2 s since:
    # its next ones may wait behind the rest of its backlog
    assert not hearing.silent(now - 1.2, now)
    late, later = _hearing(recovered_ago=RECOVERY_GRACE + 0.1)
    assert late.silent(later - 1.2, later) and not late.silent(later - 0.8, later)


def test_a_peer_not_heard_since_we_recovered_has_the_grace() -> None:
    hearing, now = _hearing(recovered_ago=2.0)
    assert not hearing.silent(now - 5.0, now)  # its queued heartbeats may still be on their way
    late, later = _hearing(recovered_ago=RECOVERY_GRACE + 0.1)
    assert late.silent(later - 10.0, later)  # past the grace: gone
