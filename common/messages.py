"""Every control message that crosses NATS: typed dataclasses and one msgpack codec.

On the wire a message is a msgpack map `{"v": VERSION, "t": <type name>, "b": {field: value}}`.
`decode` checks the version, the type (and that it is the one the subscriber expects), that
every field without a default is present (`encode` leaves out fields at their default), that each
is of its declared type, and that there are no unknown fields; anything
else is a `MessageError` naming what was wrong, never a half-built object. No pickle: a peer can
only ever make us build one of the dataclasses below.

Tensors never travel here: bulk KV and activations go over UCX (`common.tensor_channel`), and a
control message only says what to expect there (shapes, tags, addresses).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import msgpack

from common.errors import AdrenalineError, InvalidRequestError
from common.sampling_checks import check_sampling

VERSION = 1


class MessageError(AdrenalineError):
    """A control message that cannot be decoded: malformed, unknown, or from another version."""


# ---- value checks -----------------------------------------------------------------------------
# Types alone let through messages that kill a service: a hand-off of 0 KV tokens, a heartbeat
# with a block size of 0 (a division in every submit), a tag UCX cannot carry. Each message's
# `__post_init__` checks its values, so a bad one is never built, here or by a peer; `decode`
# turns the failure into a `MessageError`, which the bus logs, counts and drops.
MAX_ID_LEN = 256  # request and instance ids
MAX_TAG = 2**64 - 1  # UCX tags are 64-bit
ROLES = ("prefill", "decode", "executor")
FINISH_REASONS = (None, "stop", "length", "abort", "error")


def _check(ok: bool, field_name: str, value: Any, wanted: str) -> None:
    if not ok:
        raise MessageError(f"{field_name}: {value!r} is not {wanted}")


def _check_id(field_name: str, value: str, empty_ok: bool = False) -> None:
    _check((empty_ok or bool(value)) and len(value) <= MAX_ID_LEN, field_name, value, f"an id of 1-{MAX_ID_LEN} chars")


def _check_subject(field_name: str, value: str) -> None:
    """A concrete NATS subject to publish to: no wildcards, no whitespace, no empty tokens."""
    tokens = value.split(".")
    ok = 0 < len(value) <= MAX_ID_LEN and all(t and t not in ("*", ">") for t in tokens)
    _check(ok and not any(c.isspace() for c in value), field_name, value, "a NATS subject without wildcards")


def _check_count(field_name: str, value: int, low: int = 0, high: int = 2**62) -> None:
    _check(low <= value <= high, field_name, value, f"in [{low}, {high}]")


def _check_tokens(field_name: str, values: list[int], nonempty: bool) -> None:
    _check(bool(values) or not nonempty, field_name, values, "non-empty")
    _check(all(0 <= t < 2**31 for t in values), field_name, values[:8], "token ids in [0, 2^31)")


def _check_seconds(field_name: str, value: float | None) -> None:
    _check(value is None or (math.isfinite(value) and value >= 0), field_name, value, "a finite duration >= 0")


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
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: list[tuple[int, float]] = field(default_factory=list)  # (token id, bias) pairs
    min_p: float = 0.0
    bad_words: list[list[int]] = field(default_factory=list)  # banned token sequences
    prompt_logprobs: int | None = None  # the prefill instance reports the prompt tokens' logprobs

    def __post_init__(self) -> None:
        try:
            check_sampling(self)
        except InvalidRequestError as exc:
            raise MessageError(str(exc)) from None


@dataclass(frozen=True)
class SubmitRequest:
    """gateway -> scheduler: serve this tokenized request and publish its tokens to `token_subject`."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    token_subject: str
    # Resumed (decode -> scheduler, `Subjects.resume`): the tokens it has generated and delivered so
    # far. Its KV was lost (a full executor handed it back): a prefill instance recomputes the KV of
    # the prompt and these, and samples the next token, at index len(output_token_ids).
    output_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_tokens("prompt_token_ids", self.prompt_token_ids, nonempty=True)
        _check_subject("token_subject", self.token_subject)
        _check_tokens("output_token_ids", self.output_token_ids, nonempty=False)
        _check_count("output_token_ids", len(self.output_token_ids), 0, max(0, self.sampling.max_new_tokens - 1))

    @property
    def num_tokens(self) -> int:
        """Its context: the prompt and what it has generated (all of it recomputed on a resume)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)


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

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_count("status", self.status, 100, 599)


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
    sent_at: float = 0.0  # the sender's wall clock (s): how late a heartbeat arrives, for the logs
    # decode: (request id, context length) of each running request, local or offloaded, so that the
    # scheduler knows how long they are without reading their token streams
    lengths: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check_id("instance_id", self.instance_id)
        _check(self.role in ROLES, "role", self.role, f"one of {ROLES}")
        _check_count("block_size", self.block_size, 1, 2**20)
        _check_count("total_blocks", self.total_blocks)
        _check_count("free_blocks", self.free_blocks, 0, self.total_blocks)
        for name in ("running", "waiting", "max_num_seqs", "waiting_tokens"):
            _check_count(name, getattr(self, name))
        for name in ("step_model", "attention_model"):
            values = getattr(self, name)
            _check(len(values) in (0, 3) and all(map(math.isfinite, values)), name, values, "[] or 3 finite numbers")
        _check_id("colocated_with", self.colocated_with, empty_ok=True)
        _check_seconds("offload_stall_s", self.offload_stall_s)
        for request_id, length in self.lengths:
            _check_id("lengths", request_id)
            _check_count("lengths", length)


# A request that waits on an instance (queued for a prefill step, preempted, or queued to recompute
# for room) gets an event with no token and no ending this often, so that the gateway's token
# timeout tells a dead backend from a busy one (`TokenEvent.keeps_alive`, `common.keepalive.KeepAlive`).
KEEPALIVE_S = 5.0


@dataclass(frozen=True)
class TokenEvent:
    """One request's progress in one step: the tokens since the last event, and how it ended."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str = ""
    # the position of token_ids[0] in the request's output: NATS delivers at most once and events
    # come from two instances (prefill's first token, decode's others), so the gateway puts them
    # in order and notices one that never came (`services.gateway.backend.Generation`)
    first_index: int = 0
    # `Sampling.prompt_logprobs`: the prompt's tokens' logprobs from its second token on, and the most
    # likely tokens at each position (`common.request.PromptLogprobs`). The prefill instance sends
    # them before the first token, in events of their own with no output token, split so that no
    # message nears NATS's payload limit (`services.runtime.prompt_logprob_events`).
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def keeps_alive(self) -> bool:
        """An event that only says the request is still held (`KEEPALIVE_S`)."""
        return not self.token_ids and self.finish_reason is None and not self.prompt_logprobs

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_tokens("token_ids", self.token_ids, nonempty=False)
        _check_count("first_index", self.first_index, 0, 2**31)
        _check(self.finish_reason in FINISH_REASONS, "finish_reason", self.finish_reason, f"one of {FINISH_REASONS}")
        # a log-probability is at most 0 (-inf allowed: a token masked out); NaN would reach clients as JSON
        for name in ("logprobs", "prompt_logprobs"):
            values = getattr(self, name)
            _check(all(_logprob(x) for x in values), name, values[:8], "log-probabilities")
        for name in ("top_logprobs", "prompt_top_logprobs"):
            for top in getattr(self, name):
                _check(all(_logprob(x) for _, x in top), name, top, "log-probabilities")
                _check_tokens(name, [t for t, _ in top], nonempty=False)
        rows = len(self.prompt_top_logprobs)
        _check(rows == len(self.prompt_logprobs), "prompt_top_logprobs", rows, "one row per prompt logprob")


def _logprob(value: float) -> bool:
    return not math.isnan(value) and value <= 0.0


@dataclass(frozen=True)
class TokenBatch:
    """decode (or prefill, for the first token) -> gateway: every event of one step, one message."""

    events: list[TokenEvent]


@dataclass(frozen=True)
class AbortRequest:
    """anyone -> everyone holding the request: stop it and free its KV blocks."""

    request_id: str
    reason: str

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)


@dataclass(frozen=True)
class PrefillTask:
    """scheduler -> one prefill instance (request/reply): prefill this request, hand it to `decode_id`."""

    request: SubmitRequest
    decode_id: str
    decode_address: bytes  # the decode instance's UCX worker address, from its heartbeats
    executor_id: str = ""  # set when the request is offloaded: its KV goes to this attention executor
    executor_address: bytes = b""

    def __post_init__(self) -> None:
        _check_id("decode_id", self.decode_id)
        _check_id("executor_id", self.executor_id, empty_ok=True)


@dataclass(frozen=True)
class Ack:
    """A yes/no answer to a request/reply message, with the reason for a no."""

    accepted: bool
    error: str = ""
    send_kv: bool = True  # to a KVHandoff: False when the decode instance will recompute the KV instead


@dataclass(frozen=True)
class KVHandoff:
    """prefill -> decode or executor (request/reply): a prefilled request, whose prompt KV follows over UCX.

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
    # executor -> decode, once the KV has landed on the executor: it holds the KV, no transfer follows
    executor_id: str = ""
    executor_address: bytes = b""
    decode_id: str = ""  # prefill -> executor: the decode instance the executor hands the request to

    def __post_init__(self) -> None:
        _check_tokens("first_token_id", [self.first_token_id], nonempty=True)
        _check_count("num_kv_tokens", self.num_kv_tokens, 1, self.request.num_tokens)
        _check_count("tag", self.tag, 0, MAX_TAG)
        _check_id("executor_id", self.executor_id, empty_ok=True)
        _check(bool(self.executor_id) == bool(self.executor_address), "executor_address", "", "given with executor_id")
        _check_id("decode_id", self.decode_id, empty_ok=True)


@dataclass(frozen=True)
class Admitted:
    """decode or executor -> scheduler: the request's KV has landed on `instance_id`.

    From then on a dead prefill instance no longer matters to the request.
    """

    request_id: str
    instance_id: str

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)
        _check_id("instance_id", self.instance_id)


@dataclass(frozen=True)
class RequestsEnded:
    """prefill or decode -> scheduler: these requests ended (finished, or failed there), so their
    places are free. Sent beside the token batches that carry their final events
    (`services.runtime.publish_events`): the scheduler does not read the token streams."""

    request_ids: list[str]

    def __post_init__(self) -> None:
        for request_id in self.request_ids:
            _check_id("request_ids", request_id)


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

    def __post_init__(self) -> None:
        _check_id("decode_id", self.decode_id)
        _check(bool(self.decode_address), "decode_address", self.decode_address, "a UCX worker address")
        _check(bool(self.request_ids), "request_ids", self.request_ids, "non-empty")
        _check(len(self.request_ids) == len(self.context_lens), "context_lens", self.context_lens, "one per request")
        for request_id in self.request_ids:
            _check_id("request_ids", request_id)
        _check(all(1 <= n < 2**31 for n in self.context_lens), "context_lens", self.context_lens[:8], ">= 1")
        _check_count("tag_base", self.tag_base, 0, MAX_TAG)


@dataclass(frozen=True)
class ReleaseKV:
    """decode -> executor: the request ended; free its KV."""

    request_id: str

    def __post_init__(self) -> None:
        _check_id("request_id", self.request_id)


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

    def __post_init__(self) -> None:
        _check_count("inflight", self.inflight)


@dataclass(frozen=True)
class GatewayHeartbeat:
    """gateway -> scheduler, periodically: the gateway reading `token_subject` is alive.

    A gateway that dies and never comes back under its id leaves its requests running to their
    `max_tokens`, holding KV; the scheduler aborts the requests of a gateway it has heard from
    once and then not for `ADRENALINE_GATEWAY_DEAD_AFTER_S`.
    """

    gateway_id: str
    token_subject: str  # where its requests' tokens go: what the scheduler's in-flight requests name

    def __post_init__(self) -> None:
        _check_id("gateway_id", self.gateway_id)
        _check_subject("token_subject", self.token_subject)


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
        RequestsEnded,
        StatusRequest,
        ClusterStatus,
        StepBegin,
        ReleaseKV,
        GatewayHeartbeat,
    )
}
MESSAGE_TYPES: tuple[type[Any], ...] = tuple(_REGISTRY.values())
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
    hint: Any = expected  # a hashable class; mypy sees type[M] as not Hashable
    result: M = _converter(hint)(envelope["b"], name)
    return result


def _to_wire(value: Any) -> Any:
    """A message as msgpack takes it. A field at its default is left out (`decode` fills it in): a
    field that most messages leave empty (`TokenEvent`'s logprobs, which a request asks for or not)
    then costs those messages nothing."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        defaults = _defaults(type(value))
        wire = {}
        for f in dataclasses.fields(value):
            field_value = getattr(value, f.name)
            if f.name not in defaults or field_value != defaults[f.name]:
                wire[f.name] = _to_wire(field_value)
        return wire
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    return value


@functools.cache
def _defaults(cls: type) -> dict[str, Any]:
    """A message class's default field values, worked out once (only compared, never handed out)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def _schema(cls: type) -> tuple[dict[str, Any], frozenset[str], frozenset[str]]:
    """A message class's field types, field names and required fields, worked out once: resolving
    the annotations (`get_type_hints`) on every decode was most of the scheduler's and the
    gateway's time under load."""
    fields = dataclasses.fields(cls)
    names = frozenset(f.name for f in fields)
    return get_type_hints(cls), names, frozenset(f.name for f in fields if _required(f))


# Checks a wire value against one type and builds it; the str names the field for errors.
Converter = Callable[[Any, str], Any]


@functools.cache
def _converter(hint: Any) -> Converter:
    """The checker-builder for one type, worked out once per type: interpreting the annotations
    for every value (`get_origin`, `is_dataclass` per field) was most of a decode's time, and
    a gateway decodes every token batch of its requests. A message type's converter, built
    here once, is the only caller of `_schema`."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = tuple(_converter(option) for option in get_args(hint))

        def union(value: Any, where: str) -> Any:
            for option in options:
                try:
                    return option(value, where)
                except MessageError:
                    continue
            raise MessageError(f"{where}: {value!r} is not a {hint}")

        return union
    if hint is type(None):

        def null(value: Any, where: str) -> None:
            if value is not None:
                raise MessageError(f"{where}: expected null, got {value!r}")

        return null
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _message_converter(hint)
    if origin is list:
        (item_hint,) = get_args(hint)
        item = _converter(item_hint)
        plain = item_hint if item_hint in (int, str, bytes, bool) else None  # checked in one pass

        def listing(value: Any, where: str) -> list[Any]:
            if not isinstance(value, list):
                raise MessageError(f"{where}: expected a list, got {type(value).__name__}")
            if plain is not None and all(type(v) is plain for v in value):
                return value
            return [item(v, f"{where}[{i}]") for i, v in enumerate(value)]

        return listing
    if origin is tuple:
        items = tuple(_converter(arg) for arg in get_args(hint))

        def pair(value: Any, where: str) -> tuple[Any, ...]:
            if not isinstance(value, list) or len(value) != len(items):
                raise MessageError(f"{where}: expected a list of {len(items)}")
            return tuple(c(v, f"{where}[{i}]") for i, (v, c) in enumerate(zip(value, items, strict=True)))

        return pair
    if hint is float:

        def number(value: Any, where: str) -> float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise MessageError(f"{where}: expected a number, got {value!r}")

        return number
    if hint in (int, str, bytes, bool):

        def exact(value: Any, where: str) -> Any:
            if type(value) is not hint:
                raise MessageError(f"{where}: expected {hint.__name__}, got {type(value).__name__}")
            return value

        return exact

    def unsupported(value: Any, where: str) -> Any:
        raise MessageError(f"{where}: unsupported field type {hint}")  # a bug in this module, not the peer's

    return unsupported


def _message_converter(cls: type) -> Converter:
    hints, names, required = _schema(cls)
    fields = {k: _converter(h) for k, h in hints.items()}

    def message(value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected a map for {cls.__name__}")
        unknown = value.keys() - names
        if unknown:
            raise MessageError(f"{where}: unknown field(s) {sorted(unknown)}")
        missing = required - value.keys()
        if missing:
            raise MessageError(f"{where}: missing field(s) {sorted(missing)}")
        built = {k: fields[k](v, f"{where}.{k}") for k, v in value.items()}
        try:
            return cls(**built)
        except MessageError as exc:  # a value check (`__post_init__`)
            raise MessageError(f"{where}.{exc}") from None

    return message


def _required(f: dataclasses.Field[Any]) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
