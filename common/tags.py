"""UCX tags, built in one place: UCX matches a receive by tag alone within a worker, so every
transfer in flight towards one process must carry a tag that no other transfer can have.

    bit 63 = 0   KV hand-off:  [0][hash(sender id): 23 bits][sequence: 40 bits]
    bit 63 = 1   decode step:  [1][hash(decode id): 16 bits][executor slot: 8 bits][step: 31 bits][layer: 8 bits]

A hand-off receiver (decode instance or executor) tells senders apart by the hash of the
prefill instance's id; a decode instance tells its executors' answers apart by the slot it gave
each executor; an executor tells decode instances apart by the hash of their ids. Hashes can
collide (1 in 2^16 per pair of decode instances); ids are checked where a collision would bite.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator

MAX_LAYERS = 1 << 8
MAX_EXECUTORS = 1 << 8
_STEP_BIT = 1 << 63


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
