"""Every control message a peer could send decodes to a valid message or is refused, never more.

A property test over every message type (hypothesis, `tests/message_strategies.py`): whatever
the wire body, `decode` returns a message whose values passed its checks, or raises
`MessageError`; no other exception reaches a subscriber. Then the values that once killed a
service, each refused by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.messages import (
    MESSAGE_TYPES,
    InstanceLoad,
    KVHandoff,
    MessageError,
    Sampling,
    StepBegin,
    SubmitRequest,
    TokenEvent,
    decode,
    encode,
)
from tests.message_strategies import packed, wire_bodies

SUBMIT = SubmitRequest("r-1", [5, 6, 7], Sampling(max_new_tokens=4), "test.gateway.gw.tokens")
LOAD = InstanceLoad("decode-0", "decode", b"", 16, 100, 40, 3, 1)
PROMPT = TokenEvent("r-1", [], prompt_logprobs=[-0.5, -1.0], prompt_top_logprobs=[[(3, -0.5)], [(4, -0.2)]])


@st.composite
def any_message(draw: st.DrawFn) -> tuple[type[Any], bytes]:
    cls = draw(st.sampled_from(MESSAGE_TYPES))
    return cls, packed(cls, draw(wire_bodies(cls)))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_message())
def test_any_wire_body_decodes_to_a_valid_message_or_is_refused(case: tuple[type[Any], bytes]) -> None:
    cls, data = case
    try:
        message = decode(data, cls)
    except MessageError:
        return
    assert isinstance(message, cls)
    assert decode(encode(message), cls) == message  # what decoded re-encodes to itself


@given(st.binary(max_size=64), st.sampled_from(MESSAGE_TYPES))
def test_any_bytes_decode_or_are_refused(data: bytes, cls: type[Any]) -> None:
    with contextlib.suppress(MessageError):
        assert isinstance(decode(data, cls), cls)


def _wire(message: Any, **changes: Any) -> bytes:
    """`message` on the wire with some fields replaced, bypassing the constructor's checks."""
    body = encode_body(message)
    body.update(changes)
    return packed(type(message), body)


def encode_body(message: Any) -> dict[str, Any]:
    import msgpack

    body: dict[str, Any] = msgpack.unpackb(encode(message))["b"]
    return body


@pytest.mark.parametrize(
    ("message", "changes", "named"),
    [
        # once: the decode's serve loop ended on a hand-off of no KV
        (KVHandoff(SUBMIT, 9, 3, 77, b""), {"num_kv_tokens": 0}, "num_kv_tokens"),
        (KVHandoff(SUBMIT, 9, 3, 77, b""), {"num_kv_tokens": 4}, "num_kv_tokens"),  # more than the prompt
        (KVHandoff(SUBMIT, 9, 3, 77, b""), {"tag": -1}, "tag"),
        (KVHandoff(SUBMIT, 9, 3, 77, b""), {"first_token_id": -5}, "first_token_id"),
        (KVHandoff(SUBMIT, 9, 3, 77, b""), {"executor_id": "executor-0"}, "executor_address"),  # where to?
        # once: a division by zero in every submit
        (LOAD, {"block_size": 0}, "block_size"),
        (LOAD, {"free_blocks": 101}, "free_blocks"),
        (LOAD, {"role": "gateway"}, "role"),
        (LOAD, {"step_model": [1.0, float("nan"), 2.0]}, "step_model"),
        (LOAD, {"offload_stall_s": float("inf")}, "offload_stall_s"),
        (SUBMIT, {"prompt_token_ids": []}, "prompt_token_ids"),
        (SUBMIT, {"token_subject": "test.gateway.*.tokens"}, "token_subject"),  # a wildcard: every gateway
        (SUBMIT, {"request_id": ""}, "request_id"),
        (StepBegin("decode-0", b"addr", ["r-1"], [5], 0), {"context_lens": [5, 6]}, "context_lens"),
        (StepBegin("decode-0", b"addr", ["r-1"], [5], 0), {"context_lens": [0]}, "context_lens"),
        (StepBegin("decode-0", b"addr", ["r-1"], [5], 0), {"decode_address": b""}, "decode_address"),
        (TokenEvent("r-1", [1]), {"finish_reason": "exploded"}, "finish_reason"),
        # NaN or a positive "log-probability" would reach clients as JSON; rows must match their logprobs
        (PROMPT, {"prompt_logprobs": [-0.5, float("nan")]}, "prompt_logprobs"),
        (PROMPT, {"prompt_top_logprobs": [[[3, -0.5]], [[4, 0.2]]]}, "prompt_top_logprobs"),
        (PROMPT, {"prompt_top_logprobs": [[[3, -0.5]]]}, "prompt_top_logprobs"),
        (SUBMIT, {"sampling": {"max_new_tokens": 4, "min_p": 1.5}}, "min_p"),
        (SUBMIT, {"sampling": {"max_new_tokens": 4, "bad_words": [[5], []]}}, "bad_words"),
        (SUBMIT, {"sampling": {"max_new_tokens": 4, "prompt_logprobs": 21}}, "prompt_logprobs"),
    ],
)
def test_values_that_once_killed_a_service_are_refused_by_name(
    message: Any, changes: dict[str, Any], named: str
) -> None:
    assert decode(_wire(message), type(message)) == message
    with pytest.raises(MessageError, match=named):
        decode(_wire(message, **changes), type(message))


def test_a_bad_value_in_a_nested_message_names_its_path() -> None:
    handoff = KVHandoff(SUBMIT, 9, 3, 77, b"")
    body = encode_body(handoff)
    body["request"]["prompt_token_ids"] = [-1]
    with pytest.raises(MessageError, match=r"KVHandoff\.request\.prompt_token_ids"):
        decode(packed(KVHandoff, body), KVHandoff)


def test_our_own_code_cannot_build_a_bad_message() -> None:
    with pytest.raises(MessageError, match="block_size"):
        dataclasses.replace(LOAD, block_size=0)
