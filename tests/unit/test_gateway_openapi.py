"""The pieces of the gateway's OpenAPI document that are computed rather than declared."""

from __future__ import annotations

import re

import pytest

from services.gateway.openapi import MAX_TOKEN_KEY_LENGTH, digits_below


def _server_takes(key: str, limit: int) -> bool:
    """What `PromptBuilder._logit_bias` accepts as a token id key (with a vocabulary of `limit`)."""
    return key.isascii() and key.isdigit() and len(key) <= MAX_TOKEN_KEY_LENGTH and int(key) < limit


@pytest.mark.parametrize("limit", [1, 2, 9, 10, 11, 100, 384, 1000, 32000, 128256, 151936])
def test_digits_below_matches_exactly_the_keys_the_server_takes(limit: int) -> None:
    pattern = re.compile(digits_below(limit))
    keys = [str(i) for i in range(min(limit * 2 + 50, 400_000))]
    keys += [f"0{k}" for k in keys[:2000]] + ["", "-1", "1.0", "+1", " 1", "1 ", "x", "00", "٣"]
    for key in keys:
        matched = bool(pattern.fullmatch(key)) and 1 <= len(key) <= MAX_TOKEN_KEY_LENGTH
        assert matched == _server_takes(key, limit), (limit, key)
