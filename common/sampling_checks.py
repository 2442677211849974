"""What makes sampling parameters valid, in one torch-free place.

Both forms check with it: `common.sampling.SamplingParams` (the engine's, built by the gateway
from an HTTP request, so a bad value is a 400 naming the field) and the wire form
`common.messages.Sampling` (so a peer cannot make a service build a bad one). The scheduler
and gateway read messages without importing torch, hence a module of its own.

Token ids are checked against the vocabulary where it is known (the gateway, `Engine.validate`);
here only against what a token id can be at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from common.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI defines them
MAX_REPETITION_PENALTY = 100.0  # any finite value > 0 has a meaning; past this it is a mistake
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100], as OpenAI defines it
MAX_LOGIT_BIAS_TOKENS = 300  # as OpenAI: more entries are refused
MAX_BAD_WORD_SEQUENCES = 128  # banned token sequences: the gateway makes up to two per word of `bad_words`
MAX_BAD_WORD_TOKENS = 512  # tokens per banned sequence; every step compares the output's tail with each


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
    def stop_token_ids(self) -> Sequence[int]: ...
    @property
    def logprobs(self) -> int | None: ...
    @property
    def min_tokens(self) -> int: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def logit_bias(self) -> Sequence[tuple[int, float]]: ...
    @property
    def min_p(self) -> float: ...
    @property
    def bad_words(self) -> Sequence[Sequence[int]]: ...
    @property
    def prompt_logprobs(self) -> int | None: ...


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
    if any(not _is_token(t) for t in p.stop_token_ids):
        raise InvalidRequestError("stop_token_ids", f"must be token ids in [0, 2**31), got {p.stop_token_ids!r}")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
            raise InvalidRequestError(name, f"must be in [0, {MAX_LOGPROBS}], got {value!r}")
    if not _is_number(p.min_p) or not 0.0 <= p.min_p <= 1.0:
        raise InvalidRequestError("min_p", f"must be in [0, 1], got {p.min_p!r}")
    if not _is_int(p.min_tokens) or not 0 <= p.min_tokens <= p.max_new_tokens:
        raise InvalidRequestError(
            "min_tokens", f"must be an integer in [0, max_tokens={p.max_new_tokens}], got {p.min_tokens!r}"
        )
    if not _is_number(p.repetition_penalty) or not 0.0 < p.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise InvalidRequestError(
            "repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}], got {p.repetition_penalty!r}"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
            raise InvalidRequestError(name, f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value!r}")
    _check_logit_bias(p.logit_bias)
    _check_bad_words(p.bad_words)


def _check_logit_bias(bias: Sequence[tuple[int, float]]) -> None:
    if len(bias) > MAX_LOGIT_BIAS_TOKENS:
        raise InvalidRequestError("logit_bias", f"must name at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}")
    seen = set()
    for token, value in bias:
        if not _is_token(token) or token in seen:
            raise InvalidRequestError("logit_bias", f"must map distinct token ids in [0, 2**31), got {token!r}")
        if not _is_number(value) or not math.isfinite(value) or abs(value) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                "logit_bias", f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {value!r}"
            )
        seen.add(token)


def _check_bad_words(words: Sequence[Sequence[int]]) -> None:
    if len(words) > MAX_BAD_WORD_SEQUENCES:
        raise InvalidRequestError(
            "bad_words", f"must ban at most {MAX_BAD_WORD_SEQUENCES} token sequences, got {len(words)}"
        )
    for word in words:
        if not 1 <= len(word) <= MAX_BAD_WORD_TOKENS or not all(_is_token(t) for t in word):
            raise InvalidRequestError(
                "bad_words", f"each must be 1-{MAX_BAD_WORD_TOKENS} token ids in [0, 2**31), got {list(word)[:8]!r}"
            )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_token(x: object) -> bool:
    return _is_int(x) and 0 <= x < 2**31  # type: ignore[operator]


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x  # rejects NaN
