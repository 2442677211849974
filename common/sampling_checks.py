"""What makes sampling parameters valid, in one torch-free place.

Both forms check with it: `common.sampling.SamplingParams` (the engine's, built by the gateway
from an HTTP request, so a bad value is a 400 naming the field) and the wire form
`common.messages.Sampling` (so a peer cannot make a service build a bad one). The scheduler
and gateway read messages without importing torch, hence a module of its own.
"""

from __future__ import annotations

from typing import Protocol

from common.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0


class SamplingValues(Protocol):
    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop_token_ids(self) -> tuple[int, ...] | list[int]: ...
    @property
    def logprobs(self) -> int | None: ...


def check_sampling(p: SamplingValues) -> None:
    """Raise `InvalidRequestError` naming the first field out of range."""
    if not _is_int(p.max_new_tokens) or p.max_new_tokens < 1:
        raise InvalidRequestError("max_new_tokens", f"must be an integer >= 1, got {p.max_new_tokens!r}")
    if not _is_number(p.temperature) or not 0.0 <= p.temperature <= MAX_TEMPERATURE:
        raise InvalidRequestError("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {p.temperature!r}")
    if not _is_number(p.top_p) or not 0.0 < p.top_p <= 1.0:
        raise InvalidRequestError("top_p", f"must be in (0, 1], got {p.top_p!r}")
    if not _is_int(p.top_k) or p.top_k < -1:
        raise InvalidRequestError("top_k", f"must be -1, 0 (all tokens) or a positive integer, got {p.top_k!r}")
    if p.seed is not None and (not _is_int(p.seed) or not 0 <= p.seed < 2**63):
        raise InvalidRequestError("seed", f"must be an integer in [0, 2**63), got {p.seed!r}")
    if any(not _is_int(t) or not 0 <= t < 2**31 for t in p.stop_token_ids):
        raise InvalidRequestError("stop_token_ids", f"must be token ids in [0, 2**31), got {p.stop_token_ids!r}")
    if p.logprobs is not None and (not _is_int(p.logprobs) or not 0 <= p.logprobs <= MAX_LOGPROBS):
        raise InvalidRequestError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {p.logprobs!r}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x  # rejects NaN
