"""The executor wait a decode instance reports decays to "unknown", so the policy probes again."""

from __future__ import annotations

from services.decode.service import STALL_TTL_S, stall_estimate


def test_a_measured_wait_is_reported_until_it_is_stale_then_unknown() -> None:
    assert stall_estimate(None, 0.0, 1.0) is None  # never measured
    assert stall_estimate(0.02, 100.0, 100.0 + STALL_TTL_S / 2) == 0.02
    assert stall_estimate(0.02, 100.0, 100.0 + STALL_TTL_S + 0.1) is None  # a load that has passed
