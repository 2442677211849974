"""A short pause of the scheduler or of NATS fails no request.

Silence is judged only while the judge hears well (`common.liveness`): the scheduler paused for
3 s used to wake up, find every heartbeat older than `dead_after_s` (1 s) and fail every request
in flight; a paused nats-server silenced every instance at once, and the decode instance failed
its executor too (UCX, and so every step, kept working). Each pause here is a real SIGSTOP of
the real process while requests decode, locally and offloaded.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from common.messages import Sampling
from tests.integration.cluster import BackendCluster, Client
from tests.integration.test_offload_services import _hf_greedy, _prompts

PAUSE_S = 3.0  # three times dead_after_s


@pytest.mark.timeout(240)
@pytest.mark.parametrize("paused", ["scheduler", "nats-server"])
def test_a_short_pause_fails_no_request(llama_dir: Path, tmp_path: Path, paused: str) -> None:
    cluster = BackendCluster(llama_dir, tmp_path, executors=True, offload_ratio=0.5)
    cluster.start()
    prompts = _prompts(6, seed=21)
    sampling = Sampling(max_new_tokens=48, temperature=0.0, ignore_eos=True)
    instances = ["prefill-0", "decode-0", "executor-0"]
    try:

        async def scenario() -> list[list[int]]:
            client = await Client.connect(cluster.nats.url)
            await client.wait_ready(prefills=1, decodes=1, executors=1)
            replies = [await client.submit(f"p{i}", p, sampling) for i, p in enumerate(prompts)]
            assert all(r.accepted for r in replies) and any(r.offloaded for r in replies), replies
            while not all(len(client.events[f"p{i}"]) >= 2 for i in range(len(prompts))):
                await asyncio.sleep(0.01)
            pid = (
                cluster.nats.process.pid
                if paused == "nats-server"
                else next(c.process.pid for c in cluster.group.children if c.name == "scheduler")
            )
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(PAUSE_S)
            finally:
                os.kill(pid, signal.SIGCONT)
            results = [await client.result(f"p{i}") for i in range(len(prompts))]
            assert all(last.finish_reason == "length" for _, last in results), results
            after = await client.submit("after", prompts[0], sampling)  # and it serves on
            assert after.accepted, after
            tokens, last = await client.result("after")
            assert last.finish_reason == "length" and tokens == results[0][0]
            await client.wait_all_free(instances)
            await client.bus.close()
            return [t for t, _ in results]

        outputs = asyncio.run(scenario())
    finally:
        cluster.stop()
    assert outputs == _hf_greedy(llama_dir, prompts, 48, ignore_eos=True)
