"""Hypothesis strategies for control messages as a peer could send them: any wire body.

`wire_bodies(cls)` builds the `b` map of a message of type `cls` from its declared field types.
Most fields get plausible values (small counts, the ids of the instances a test cluster runs), so
that many messages pass the checks and reach the services' logic; about one field a message gets
a value chosen to break things (0, negatives, 2^64 - 1, NaN, empty and huge strings, wildcard
subjects), and one message in eight loses a field, gains an unknown one or has a field of the
wrong type. Whatever does not decode must be refused with `MessageError`.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import msgpack
from hypothesis import strategies as st

from common.messages import FINISH_REASONS, ROLES, VERSION

SANE_IDS = ["prefill-0", "decode-0", "executor-0", "r0", "r1", "test.gateway.fuzz.tokens"]
WILD_IDS = ["", "x" * 300, "a.*.b", "a.>", "a b", "a..b"]
WILD_INTS = st.one_of(
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**64 - 1, -(2**63)]),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
)
WILD_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e300]))
# plausible values of fields whose meaning a type does not tell
SANE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "role": st.sampled_from(ROLES),
    "finish_reason": st.sampled_from(FINISH_REASONS),
    "status": st.sampled_from([200, 400, 429, 503]),
    "min_tokens": st.integers(min_value=0, max_value=1),  # at most max_new_tokens, whose sane values start at 1
    "logit_bias": st.lists(  # distinct token ids, as a JSON object's keys are
        st.tuples(st.integers(min_value=1, max_value=6), st.floats(min_value=-5.0, max_value=5.0)).map(list),
        max_size=3,
        unique_by=lambda pair: pair[0],
    ),
}
LOGPROBS = st.floats(min_value=-20.0, max_value=0.0)
# plausible values of fields whose meaning differs between messages of the same field name
SANE_CLASS_FIELDS: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("TokenEvent", "logprobs"): st.lists(LOGPROBS, max_size=3),
    ("KVHandoff", "num_kv_tokens"): st.just(1),  # at most the prompt's length, whose sane lists start at 1
    ("TokenEvent", "top_logprobs"): st.lists(
        st.lists(st.tuples(st.integers(min_value=1, max_value=6), LOGPROBS).map(list), max_size=2), max_size=3
    ),
    # one row of alternatives per prompt logprob: none, as most events carry
    ("TokenEvent", "prompt_logprobs"): st.just([]),
    ("TokenEvent", "prompt_top_logprobs"): st.just([]),
}
ANY = st.one_of(st.none(), st.booleans(), WILD_INTS, WILD_FLOATS, st.text(max_size=8), st.binary(max_size=8))


def value_of(hint: Any, addresses: tuple[bytes, ...] | None, wild: bool) -> st.SearchStrategy[Any]:
    """A well-typed wire value for a field declared as `hint`: plausible, or at the edges if `wild`."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return st.one_of(*(value_of(a, addresses, wild) for a in get_args(hint)))
    if hint is type(None):
        return st.none()
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return wire_bodies(hint, addresses)
    if origin is list:
        (item,) = get_args(hint)
        if wild:
            return st.lists(value_of(item, addresses, True), max_size=12)
        return st.lists(value_of(item, addresses, False), min_size=1, max_size=3)
    if origin is tuple:
        return st.tuples(*(value_of(a, addresses, wild) for a in get_args(hint))).map(list)
    if hint is int:
        return WILD_INTS if wild else st.integers(min_value=1, max_value=6)
    if hint is float:
        return WILD_FLOATS if wild else st.floats(min_value=0.05, max_value=1.0)
    if hint is str:
        return st.one_of(st.sampled_from(WILD_IDS), st.text(max_size=12)) if wild else st.sampled_from(SANE_IDS)
    if hint is bytes:
        return st.binary(max_size=16)
    if hint is bool:
        return st.booleans()
    raise TypeError(f"no strategy for {hint}")


@st.composite
def wire_bodies(draw: st.DrawFn, cls: type, addresses: tuple[bytes, ...] | None = None) -> dict[str, Any]:
    """The `b` map of a `cls` message.

    `addresses`, when given, are the only values drawn for UCX worker addresses (fields named
    `*address`): UCX aborts the whole process on some malformed addresses, and no check of ours
    can tell those apart (see docs/services.md, "What a peer can do").
    """
    hints = get_type_hints(cls)
    fields = dataclasses.fields(cls)
    body = {}
    for f in fields:
        if addresses is not None and f.name.endswith("address"):
            body[f.name] = draw(st.sampled_from(addresses))
        else:
            wild = draw(st.integers(0, len(fields))) == 0  # about one wild field a message
            sane = SANE_CLASS_FIELDS.get((cls.__name__, f.name), SANE_FIELDS.get(f.name))
            body[f.name] = draw(sane if sane is not None and not wild else value_of(hints[f.name], addresses, wild))
    if draw(st.integers(0, 7)) == 0:
        mischief = draw(st.sampled_from(["drop", "extra", "retype"]))
        if mischief == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif mischief == "extra":
            body["unexpected"] = draw(ANY)
        elif body:
            name = draw(st.sampled_from(sorted(body)))
            if addresses is None or not name.endswith("address"):
                body[name] = draw(ANY)
    return body


def packed(cls: type, body: dict[str, Any]) -> bytes:
    """The message on the wire, as `common.messages.encode` would frame it."""
    data: bytes = msgpack.packb({"v": VERSION, "t": cls.__name__, "b": body}, use_bin_type=True)
    return data
