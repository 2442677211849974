"""A step's announcement framed for UCX: what is sent is what is read, and nothing else is."""

from __future__ import annotations

import pytest
import torch

from common import announce
from common.messages import MessageError, ReleaseKV, StepBegin, encode
from common.tags import ANNOUNCE_MASK, ANNOUNCE_TAG, MAX_LAYERS, announce_tag, step_tag_base


def _received(frame: torch.Tensor) -> torch.Tensor:
    """As a receive leaves it: the frame at the start of a buffer whose rest holds older bytes."""
    buffer = torch.full((announce.MAX_BYTES,), 0xAB, dtype=torch.uint8)
    buffer[: frame.numel()] = frame
    return buffer


def test_an_announcement_reads_back_as_sent() -> None:
    begin = StepBegin("decode-0", b"\x01\x02", ["r-1", "r-2"], [17, 4], step_tag_base("decode-0", 3, 9))
    assert announce.unpack(_received(announce.pack(begin))) == begin


def test_anything_else_is_refused() -> None:
    with pytest.raises(MessageError, match="length of 0"):
        announce.unpack(_received(torch.zeros(4, dtype=torch.uint8)))
    with pytest.raises(MessageError, match="length of"):
        announce.unpack(_received(torch.full((4,), 0xFF, dtype=torch.uint8)))
    other = encode(ReleaseKV("r-1"))
    frame = torch.frombuffer(bytearray(len(other).to_bytes(4, "big") + other), dtype=torch.uint8)
    with pytest.raises(MessageError, match="expected StepBegin"):
        announce.unpack(_received(frame))
    short = torch.frombuffer(bytearray(b"\x00\x00\x00\x09abc"), dtype=torch.uint8)  # the length lies
    with pytest.raises(MessageError):
        announce.unpack(_received(short))
    huge = StepBegin("decode-0", b"\x01", [f"r-{i:0>250}" for i in range(5000)], [1] * 5000, 0)
    with pytest.raises(ValueError, match="exceeds"):
        announce.pack(huge)


def test_announcement_tags_match_the_mask_and_no_layer_tag_does() -> None:
    base = step_tag_base("decode-7", 2, 12345)
    assert announce_tag(base) & ANNOUNCE_MASK == ANNOUNCE_TAG
    assert all((base + layer) & ANNOUNCE_MASK != ANNOUNCE_TAG for layer in range(MAX_LAYERS))
    assert all(tag & ANNOUNCE_MASK != ANNOUNCE_TAG for tag in range(0, 1 << 20, 4099))  # hand-off tags
