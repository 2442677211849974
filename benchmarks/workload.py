"""The benchmark's client side: seeded workloads, and the streaming client that measures each request.

Workloads (approximations, not the datasets):
- "sharegpt": lognormal lengths; prompt median 160 (sigma 0.9, capped 1024), output median
  120 (sigma 0.8, capped 512), roughly the shape of ShareGPT conversations.
- "long-output": prompts ~64 (normal, sd 16), outputs uniform in [400, 800].
- "tiny": prompts 8-32, outputs 4-16 (smoke tests).

Per request: the time to first token (TTFT), inter-token latencies (ITL), time per output token
(TPOT = (e2e - ttft) / (output_tokens - 1)) and end-to-end latency. The client parses the
server-sent events through the official openai client, retrying a 429 (every decode instance
full right now) after 100 ms.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openai
from tqdm import tqdm


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    arrival_s: float  # offset from the start of the run


@dataclass
class Record:
    prompt_tokens: int
    max_tokens: int
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    tpot_s: float = math.nan
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    retries: int = 0
    error: str | None = None


def draw_lengths(dist: str, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    if dist == "sharegpt":
        p = np.minimum(rng.lognormal(math.log(160), 0.9, n), 1024)
        o = np.minimum(rng.lognormal(math.log(120), 0.8, n), 512)
    elif dist == "long-output":
        p = np.clip(rng.normal(64, 16, n), 16, 128)
        o = rng.uniform(400, 800, n)
    elif dist == "tiny":
        p = rng.uniform(8, 32, n)
        o = rng.uniform(4, 16, n)
    else:
        raise ValueError(f"unknown distribution {dist!r}")
    return [(max(int(a), 1), max(int(b), 2)) for a, b in zip(p, o, strict=True)]


def make_workload(dist: str, n: int, rate: float, vocab: int, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    lengths = draw_lengths(dist, n, rng)
    gaps = rng.exponential(1.0 / rate, n) if math.isfinite(rate) else np.zeros(n)
    arrivals = np.cumsum(gaps) - gaps[0]
    return [
        Request(rng.integers(3, vocab, p).tolist(), o, float(t)) for (p, o), t in zip(lengths, arrivals, strict=True)
    ]


def kv_bytes_per_token(config: dict[str, Any]) -> int:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * 4  # float32 K and V


async def send(client: openai.AsyncOpenAI, model: str, req: Request, t0: float, bar: tqdm) -> Record:
    rec = Record(len(req.prompt), req.max_tokens)
    await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
    start = time.perf_counter()
    try:
        while True:
            try:
                stream = await client.completions.create(
                    model=model,
                    prompt=req.prompt,
                    max_tokens=req.max_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )
                break
            except openai.RateLimitError:  # every decode instance full right now: wait, retry
                rec.retries += 1
                await asyncio.sleep(0.1)
        chunk_times: list[float] = []
        async for chunk in stream:
            if chunk.usage is not None:
                rec.output_tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                chunk_times.append(time.perf_counter())
        end = time.perf_counter()
        if not chunk_times:
            raise RuntimeError("no tokens streamed")
        rec.ttft_s, rec.e2e_s = chunk_times[0] - start, end - start
        # a chunk may carry several tokens: spread each gap over the tokens it delivered
        per_chunk = max(rec.output_tokens - 1, 1) / max(len(chunk_times) - 1, 1)
        for a, b in itertools.pairwise(chunk_times):
            rec.itl_s.extend([(b - a) / per_chunk] * max(round(per_chunk), 1))
        if rec.output_tokens > 1:
            rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)
    except Exception as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    bar.update(1)
    return rec


def progress(total: int, label: str) -> tqdm:
    """A progress bar on a terminal only: redirected to a file or a CI log, tqdm's redraws
    would be hundreds of lines of noise around the results."""
    return tqdm(total=total, desc=label, unit="req", disable=not sys.stderr.isatty())


async def run_workload(url: str, model: str, workload: list[Request], label: str) -> tuple[list[Record], float, float]:
    """Send the workload; returns the records, the start (`time.perf_counter()`) and the wall time."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    with progress(len(workload), label) as bar:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(send(client, model, r, t0, bar) for r in workload))
        wall = time.perf_counter() - t0
    await client.close()
    return list(records), t0, wall
