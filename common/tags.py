"""UCX tags, built in one place: UCX matches a receive by tag alone within a worker, so every
transfer in flight towards one process must carry a tag that no other transfer can have.

    bit 63 = 0   KV hand-off:  [0][hash(sender id): 23 bits][sequence: 40 bits]
    bit 63 = 1   decode step:  [1][hash(decode id): 16 bits][executor slot: 8 bits][step: 31 bits][layer: 8 bits]

Layer 255 of a step is its announcement (`StepBegin`, `common.announce`), which an executor
receives with a tag mask (`ANNOUNCE_TAG`, `ANNOUNCE_MASK`): whatever the decode instance and step.

A hand-off receiver (decode instance or executor) tells senders apart by the hash of the
prefill instance's id; a decode instance tells its executors' answers apart by the slot it gave
each executor; an executor tells decode instances apart by the hash of their ids. Hashes can
collide (1 in 2^16 per pair of decode instances); ids are checked where a collision would bite.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator

_LAYER_BITS = 8
ANNOUNCE_LAYER = (1 << _LAYER_BITS) - 1  # the layer field of a step's announcement
MAX_LAYERS = ANNOUNCE_LAYER  # layers 0..254 carry q/k/v and answers
MAX_EXECUTORS = 1 << 8
_STEP_BIT = 1 << 63
ANNOUNCE_TAG = _STEP_BIT | ANNOUNCE_LAYER
ANNOUNCE_MASK = _STEP_BIT | ANNOUNCE_LAYER  # bits that must match: a step tag, layer 255


def _hash(name: str, bits: int) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << bits) - 1)


def handoff_tags(sender_id: str) -> Iterator[int]:
    """Fresh tags for the KV hand-offs one prefill instance sends."""
    return itertools.count(_hash(sender_id, 23) << 40)


def step_tag_base(decode_id: str, executor_slot: int, step: int) -> int:
    """The tag of layer 0 of one decode step towards one executor; layer L uses base + L."""
    if not 0 <= executor_slot < MAX_EXECUTORS:
        raise ValueError(f"executor slot {executor_slot} out of range")
    return _STEP_BIT | (_hash(decode_id, 16) << 47) | (executor_slot << 39) | ((step % (1 << 31)) << 8)


def announce_tag(tag_base: int) -> int:
    """The tag of the announcement of the step whose layer 0 is `tag_base`."""
    return tag_base | ANNOUNCE_LAYER
