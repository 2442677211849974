from __future__ import annotations

import msgpack
import pytest

from common.messages import (
    VERSION,
    AbortRequest,
    InstanceLoad,
    MessageError,
    Sampling,
    SubmitRequest,
    TokenBatch,
    TokenEvent,
    decode,
    encode,
)

SUBMIT = SubmitRequest("r-1", [0, 17, 42], Sampling(max_new_tokens=8, seed=3, stop_token_ids=[1]), "t.gw-0")


def _raw(body: dict[str, object], name: str = "SubmitRequest", version: int = VERSION) -> bytes:
    return msgpack.packb({"v": version, "t": name, "b": body}, use_bin_type=True)


def test_every_message_round_trips() -> None:
    load = InstanceLoad("decode-0", "decode", b"\x00\xffucx", 16, 100, 40, 3, 1)
    batch = TokenBatch([TokenEvent("r-1", [5, 6], [-0.1, -2.0], [[(5, -0.1)], [(6, -2.0)]], "length")])
    for message in (SUBMIT, load, batch, AbortRequest("r-1", "client gone")):
        assert decode(encode(message), type(message)) == message


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"\xc1not msgpack", "not a msgpack message"),
        (msgpack.packb([1, 2]), "envelope"),
        (_raw({}, version=VERSION + 1), "version"),
        (_raw({}, name="Shutdown"), "unknown message type 'Shutdown'"),
        (_raw({}, name="AbortRequest"), "expected SubmitRequest, got AbortRequest"),
        (_raw({"request_id": "r"}), r"missing field\(s\) \['prompt_token_ids', 'sampling', 'token_subject'\]"),
        (
            _raw(
                {
                    "request_id": "r",
                    "prompt_token_ids": [1],
                    "sampling": {"max_new_tokens": 1},
                    "token_subject": "t",
                    "evil": 1,
                }
            ),
            r"unknown field\(s\) \['evil'\]",
        ),
        (
            _raw(
                {
                    "request_id": "r",
                    "prompt_token_ids": [1, "2"],
                    "sampling": {"max_new_tokens": 1},
                    "token_subject": "t",
                }
            ),
            r"prompt_token_ids\[1\]: expected int",
        ),
        (
            _raw(
                {"request_id": "r", "prompt_token_ids": [1], "sampling": {"max_new_tokens": True}, "token_subject": "t"}
            ),
            r"sampling\.max_new_tokens: expected int, got bool",
        ),
        (
            _raw(
                {
                    "request_id": "r",
                    "prompt_token_ids": [1],
                    "sampling": {"max_new_tokens": 1, "seed": "x"},
                    "token_subject": "t",
                }
            ),
            r"sampling\.seed",
        ),
    ],
)
def test_bad_messages_are_refused_with_the_reason(data: bytes, error: str) -> None:
    with pytest.raises(MessageError, match=error):
        decode(data, SubmitRequest)


def test_integers_are_accepted_where_a_float_is_declared() -> None:
    body = {
        "request_id": "r",
        "prompt_token_ids": [1],
        "sampling": {"max_new_tokens": 1, "temperature": 1},
        "token_subject": "t",
    }
    message = decode(_raw(body), SubmitRequest)
    assert message.sampling.temperature == 1.0 and isinstance(message.sampling.temperature, float)


def test_only_registered_types_encode() -> None:
    with pytest.raises(TypeError, match="not a registered message type"):
        encode({"request_id": "r"})


def test_every_message_dataclass_is_registered() -> None:
    import dataclasses

    import common.messages as messages

    declared = {n for n, v in vars(messages).items() if isinstance(v, type) and dataclasses.is_dataclass(v)}
    assert declared == set(messages._REGISTRY)


def test_fields_at_their_default_stay_off_the_wire() -> None:
    """A request that asks for no logprobs pays nothing for them: its token events carry only what is set."""
    assert msgpack.unpackb(encode(TokenEvent("r-1", [5])))["b"] == {"request_id": "r-1", "token_ids": [5]}
    asked = TokenEvent("r-1", [], prompt_logprobs=[-1.0], prompt_top_logprobs=[[(3, -1.0)]])
    assert set(msgpack.unpackb(encode(asked))["b"]) == {
        "request_id",
        "token_ids",
        "prompt_logprobs",
        "prompt_top_logprobs",
    }
    assert decode(encode(asked), TokenEvent) == asked
    assert decode(encode(SUBMIT), SubmitRequest) == SUBMIT
