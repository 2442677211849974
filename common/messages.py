"""Every control message that crosses NATS: typed dataclasses and one msgpack codec.

On the wire a message is a msgpack map `{"v": VERSION, "t": <type name>, "b": {field: value}}`.
`decode` checks the version, the type (and that it is the one the subscriber expects), that
every field is present and of its declared type, and that there are no unknown fields; anything
else is a `MessageError` naming what was wrong, never a half-built object. No pickle: a peer can
only ever make us build one of the dataclasses below.

Tensors never travel here: bulk KV and activations go over UCX (`common.tensor_channel`), and a
control message only says what to expect there (shapes, tags, addresses).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack

from common.errors import AdrenalineError

VERSION = 1


class MessageError(AdrenalineError):
    """A control message that cannot be decoded: malformed, unknown, or from another version."""


# ---- the messages -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """The request's sampling parameters as they travel; `common.sampling.SamplingParams` validates them."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None


@dataclass(frozen=True)
class SubmitRequest:
    """gateway -> scheduler: serve this tokenized request and publish its tokens to `token_subject`."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    token_subject: str


@dataclass(frozen=True)
class SubmitReply:
    """scheduler -> gateway: accepted (with where it runs) or refused with an HTTP-like status."""

    request_id: str
    accepted: bool
    status: int = 200  # 429 when full, 503 when no instance can serve, 400 for a bad request
    error: str = ""
    prefill_id: str = ""
    decode_id: str = ""
    offloaded: bool = False


@dataclass(frozen=True)
class InstanceLoad:
    """instance -> scheduler, periodically: who it is, where its UCX worker is, and how loaded it is."""

    instance_id: str
    role: str  # "prefill" | "decode" | "executor"
    ucx_address: bytes
    block_size: int
    total_blocks: int
    free_blocks: int
    running: int
    waiting: int
    colocated_with: str = ""  # an executor names its prefill instance
    # profiled `common.profiling.StepModel`s: a decode step (decode), decode attention alone (decode, executor)
    step_model: list[float] = field(default_factory=list)
    attention_model: list[float] = field(default_factory=list)
    max_num_seqs: int = 0  # a decode instance's batch limit
    offload_stall_s: float | None = None  # decode: mean wait on executors per step after local attention
    waiting_tokens: int = 0  # KV tokens its queued (preempted, or to recompute) requests will need


@dataclass(frozen=True)
class TokenEvent:
    """One request's progress in one step: the tokens since the last event, and how it ended."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str = ""


@dataclass(frozen=True)
class TokenBatch:
    """decode (or prefill, for the first token) -> gateway: every event of one step, one message."""

    events: list[TokenEvent]


@dataclass(frozen=True)
class AbortRequest:
    """anyone -> everyone holding the request: stop it and free its KV blocks."""

    request_id: str
    reason: str


@dataclass(frozen=True)
class PrefillTask:
    """scheduler -> one prefill instance (request/reply): prefill this request, hand it to `decode_id`."""

    request: SubmitRequest
    decode_id: str
    decode_address: bytes  # the decode instance's UCX worker address, from its heartbeats
    executor_id: str = ""  # set when the request is offloaded: its KV goes to this attention executor
    executor_address: bytes = b""


@dataclass(frozen=True)
class Ack:
    """A yes/no answer to a request/reply message, with the reason for a no."""

    accepted: bool
    error: str = ""
    send_kv: bool = True  # to a KVHandoff: False when the decode instance will recompute the KV instead


@dataclass(frozen=True)
class KVHandoff:
    """prefill -> decode (request/reply): a prefilled request, whose prompt KV follows over UCX.

    The decode instance allocates blocks for `num_kv_tokens`, posts a receive for `tag` and acks;
    only then does the prefill instance send one tensor `[num_layers, 2, num_kv_tokens, kv_heads,
    head_dim]` in the model's dtype with that tag. With no room for a while, the decode instance
    queues the request to recompute its KV and acks with `send_kv=False`; a refusal (a bad or
    aborted request) fails the request cleanly.
    """

    request: SubmitRequest
    first_token_id: int
    num_kv_tokens: int
    tag: int
    prefill_address: bytes
    executor_id: str = ""  # to a decode instance: the KV went to this executor instead, no transfer follows
    executor_address: bytes = b""


@dataclass(frozen=True)
class Admitted:
    """decode or executor -> scheduler (and decode): the request's KV has landed on `instance_id`.

    From then on a dead prefill instance no longer matters to the request.
    """

    request_id: str
    instance_id: str


@dataclass(frozen=True)
class StepBegin:
    """decode -> executor, once per decode step that has requests on that executor.

    Per layer, the decode instance then sends one tensor `[n, (heads + 2 * kv_heads) * head_dim]`
    (q, k, v of these requests, in this order) tagged `tag_base + layer`, and the executor answers
    with `[n, heads * head_dim]` under the same tag.
    """

    decode_id: str
    decode_address: bytes
    request_ids: list[str]
    context_lens: list[int]
    tag_base: int


@dataclass(frozen=True)
class ReleaseKV:
    """decode -> executor: the request ended; free its KV."""

    request_id: str


@dataclass(frozen=True)
class StatusRequest:
    """anyone -> scheduler (request/reply): which instances are live."""


@dataclass(frozen=True)
class ClusterStatus:
    """scheduler -> asker: live instance ids per role, and requests in flight."""

    prefill: list[str]
    decode: list[str]
    inflight: int
    executor: list[str] = field(default_factory=list)


# ---- the codec --------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Any]] = {
    cls.__name__: cls
    for cls in (
        Sampling,
        SubmitRequest,
        SubmitReply,
        InstanceLoad,
        TokenEvent,
        TokenBatch,
        AbortRequest,
        PrefillTask,
        Ack,
        KVHandoff,
        Admitted,
        StatusRequest,
        ClusterStatus,
        StepBegin,
        ReleaseKV,
    )
}
M = TypeVar("M")


def encode(message: Any) -> bytes:
    name = type(message).__name__
    if _REGISTRY.get(name) is not type(message):
        raise TypeError(f"{name} is not a registered message type")
    packed: bytes = msgpack.packb({"v": VERSION, "t": name, "b": _to_wire(message)}, use_bin_type=True)
    return packed


def decode(data: bytes, expected: type[M]) -> M:
    """Decode one message, which must be of type `expected`."""
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for one cause: bad bytes
        raise MessageError(f"not a msgpack message: {exc}") from exc
    if not isinstance(envelope, dict) or set(envelope) != {"v", "t", "b"}:
        raise MessageError("not a message envelope {v, t, b}")
    if envelope["v"] != VERSION:
        raise MessageError(f"message version {envelope['v']!r}, this build speaks {VERSION}")
    name = envelope["t"]
    if name not in _REGISTRY:
        raise MessageError(f"unknown message type {name!r}")
    if _REGISTRY[name] is not expected:
        raise MessageError(f"expected {expected.__name__}, got {name}")
    result: M = _from_wire(envelope["b"], expected, name)
    return result


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    return value


@functools.cache
def _schema(cls: type) -> tuple[dict[str, Any], frozenset[str], frozenset[str]]:
    """A message class's field types, field names and required fields, worked out once: resolving
    the annotations (`get_type_hints`) on every decode was most of the scheduler's and the
    gateway's time under load."""
    fields = dataclasses.fields(cls)
    names = frozenset(f.name for f in fields)
    return get_type_hints(cls), names, frozenset(f.name for f in fields if _required(f))


def _from_wire(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against the type `hint` and build it; `where` names the field for errors."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in get_args(hint):
            try:
                return _from_wire(value, option, where)
            except MessageError:
                continue
        raise MessageError(f"{where}: {value!r} is not a {hint}")
    if hint is type(None):
        if value is not None:
            raise MessageError(f"{where}: expected null, got {value!r}")
        return None
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected a map for {hint.__name__}")
        hints, names, required = _schema(hint)
        unknown = set(value) - names
        if unknown:
            raise MessageError(f"{where}: unknown field(s) {sorted(unknown)}")
        missing = required - set(value)
        if missing:
            raise MessageError(f"{where}: missing field(s) {sorted(missing)}")
        return hint(**{k: _from_wire(v, hints[k], f"{where}.{k}") for k, v in value.items()})
    if origin is list:
        if not isinstance(value, list):
            raise MessageError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = get_args(hint)
        return [_from_wire(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(hint)
        if not isinstance(value, list) or len(value) != len(args):
            raise MessageError(f"{where}: expected a list of {len(args)}")
        return tuple(_from_wire(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise MessageError(f"{where}: expected a number, got {value!r}")
    if hint in (int, str, bytes, bool):
        if type(value) is not hint:
            raise MessageError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
        return value
    raise MessageError(f"{where}: unsupported field type {hint}")  # a bug in this module, not the peer's


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
