"""The gateway's per-request event reader (`services.gateway.backend.Generation`), on its own.

A client that hangs up cancels the task reading its request's events; the gateway then aborts
the request on the cluster. The cancellation must win even when it comes in the same loop turn as
an event: `asyncio.wait_for` before Python 3.12 returned the event and dropped the cancellation,
and the gateway went on collecting the whole output of a request nobody would read (seen as a
flaky test under load). Here that turn is made on purpose, so it fails every time on that code.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from common.messages import TokenEvent
from services.gateway.backend import BackendClient, Generation


def _generation(queue: asyncio.Queue[TokenEvent], token_timeout: float = 30.0) -> Generation:
    backend: Any = SimpleNamespace(settings=SimpleNamespace(token_timeout=token_timeout))
    return Generation(cast(BackendClient, backend), "r", queue)


@pytest.mark.asyncio
async def test_a_cancel_that_comes_with_an_event_cancels_the_reader() -> None:
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    reader = asyncio.create_task(_generation(queue).next())
    await asyncio.sleep(0)  # the reader now waits on the queue
    queue.put_nowait(TokenEvent("r", [7]))  # wakes it, in the same turn as the cancel below
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader


@pytest.mark.asyncio
async def test_events_in_order_and_keep_alives_skipped() -> None:
    queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
    generation = _generation(queue)
    keep_alive, first = TokenEvent("r", []), TokenEvent("r", [7])
    for event in (keep_alive, first, TokenEvent("r", [8], finish_reason="length", first_index=1)):
        queue.put_nowait(event)
    assert (await generation.next()).token_ids == [7]
    last = await generation.next()
    assert last.token_ids == [8] and last.finish_reason == "length" and generation.finished
