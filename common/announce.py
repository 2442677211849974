"""A decode step's announcement to an executor (`StepBegin`), framed for UCX.

It travels in the same UCX stream as the step's q/k/v, tagged as the step's layer 255
(`common.tags.announce_tag`), rather than over NATS: through NATS it crossed the decode
instance's event loop, nats-server and the executor's subscription, and arrived 2 ms after the
first layer's q/k/v on the 2-core development VM (median; docs/benchmarks.md), which every
offloaded step then waited out. An executor keeps one receive posted for any announcement (a tag
mask), into a buffer of `MAX_BYTES`.

Frame: 4 bytes of payload length (big-endian), then the msgpack of the message
(`common.messages.encode`), zero-padded by nothing: UCX does not report how many bytes a receive
got, so the length says where the message ends. Every value is checked on decode as any
control message's is.
"""

from __future__ import annotations

import torch

from common.messages import MessageError, StepBegin, decode, encode

MAX_BYTES = 1 << 20  # a step of 1024 requests with 256-character ids fits in a third of it
_HEADER = 4


def pack(begin: StepBegin) -> torch.Tensor:
    """The frame to send, as a uint8 tensor; ValueError if it exceeds MAX_BYTES."""
    payload = encode(begin)
    if _HEADER + len(payload) > MAX_BYTES:
        raise ValueError(f"a step announcement of {len(payload)} bytes exceeds {MAX_BYTES}")
    frame = len(payload).to_bytes(_HEADER, "big") + payload
    return torch.frombuffer(bytearray(frame), dtype=torch.uint8)


def buffer() -> torch.Tensor:
    """A receive buffer for any frame."""
    return torch.empty(MAX_BYTES, dtype=torch.uint8)


def unpack(frame: torch.Tensor) -> StepBegin:
    """The announcement in a received buffer; MessageError for anything that is not one."""
    raw = frame[:_HEADER].numpy().tobytes()
    size = int.from_bytes(raw, "big")
    if not 0 < size <= MAX_BYTES - _HEADER:
        raise MessageError(f"step announcement: a length of {size} bytes")
    return decode(frame[_HEADER : _HEADER + size].numpy().tobytes(), StepBegin)
