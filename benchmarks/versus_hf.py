"""The engine against transformers' `generate`, side by side in one run, on the same prompts.

Both run greedy, in this process, with the same torch threads, on the same random prompts:
transformers as one static batch (`generate` with a padded batch and its KV cache; equal-length
prompts need no padding), the engine with continuous batching over its paged KV cache. Every
request generates exactly `output_len` tokens (end-of-sequence ignored on both sides), and the
two are run alternately, `--repeats` times each, so drift of a shared machine hits both alike.
Output throughput is generated tokens over wall time, prefill included. Where prompts have one
length (no padding on the transformers side), the benchmark also checks that both produced the
same tokens.

With `--served`, the whole cluster joins the comparison: `adrenaline up`'s topology with its
defaults (as local processes, idle between runs) serves the same prompts as concurrent
streaming completions (`ignore_eos`, greedy; the client parses the event stream itself, as
`vllm bench serve` does), alternately with the engine and transformers, and its output is
checked against the engine's.

    python -m benchmarks.versus_hf [--model DIR] [--threads 1] [--repeats 3] [--served]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from common.config import EngineConfig
from common.engine import Engine
from common.model.tiny import make_tiny
from common.natsd import free_port
from common.sampling import SamplingParams


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    prompt_lens: tuple[int, int]  # uniform in [low, high]; low == high: one length
    output_len: int

    def prompts(self, vocab: int, seed: int = 0) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        low, high = self.prompt_lens
        lengths = torch.randint(low, high + 1, (self.num_prompts,), generator=gen).tolist()
        return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


WORKLOADS = [
    Workload("32 x 128 in, 64 out", 32, (128, 128), 64),
    Workload("32 x 512 in, 128 out", 32, (512, 512), 128),
    Workload("32 x 32-512 in (mixed), 128 out", 32, (32, 512), 128),
]


@dataclass(frozen=True)
class Result:
    workload: str
    hf_tok_s: float  # median over repeats
    engine_tok_s: float
    ratio: float  # engine / transformers, median of the per-repeat ratios
    same_tokens: bool | None  # None where padding makes transformers' numerics differ by design
    served_tok_s: float | None = None  # the cluster through the OpenAI API, with --served
    served_vs_engine: float | None = None  # medians of per-repeat ratios
    served_vs_hf: float | None = None
    served_same_as_engine: bool | None = None


def hf_generate(model: PreTrainedModel, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    """One static, left-padded batch; every row generates exactly `output_len` tokens."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    # `generate` fills an unset eos_token_id from the model's own generation config, so the model's
    # default is cleared: rows must not stop (or be padded) at end-of-sequence, as in the engine.
    model.generation_config.eos_token_id = None
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, pad_token_id=0, use_cache=True)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # type: ignore[operator]
    rows: list[list[int]] = out[:, width:].tolist()
    if any(len(r) != output_len for r in rows):
        raise RuntimeError("transformers stopped early: the comparison would not be like for like")
    return rows


def engine_generate(engine: Engine, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
    return [r.output_token_ids for r in engine.generate(prompts, params)]


async def served_generate(url: str, model: str, prompts: list[list[int]], output_len: int) -> list[str]:
    """Every prompt (token ids) as its own streaming completion, all at once, as concurrent clients
    would send them; returns each completion's text.

    The client reads the server-sent events itself (httpx, one JSON parse per event), as `vllm
    bench serve` does, rather than through the openai package: on a 2-core machine the client
    shares the cores with the cluster, and the openai client's per-chunk cost (~185 us, 0.38 s of
    CPU per 2,048 chunks here, against ~100 us with this loop) would be charged to the server.
    The tests drive the gateway with the official client.
    """
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=600, limits=limits) as client:

        async def one(prompt: list[int]) -> str:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": output_len,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            parts = []
            async with client.stream("POST", "/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        event = json.loads(line[len("data: ") :])
                        if "error" in event:
                            raise RuntimeError(f"the server failed a completion: {event['error']}")
                        parts.append(event["choices"][0]["text"])
            return "".join(parts)

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def run(model_dir: Path, workloads: list[Workload], repeats: int, served: bool = False) -> list[Result]:
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    config = EngineConfig(kv_cache_bytes=1 << 30, max_num_seqs=256)  # otherwise the defaults the cluster runs
    engine = Engine.from_folder(model_dir, config)
    if not served:
        return [_compare(hf, engine, None, w, repeats) for w in workloads]
    from services.local_cluster import LocalCluster  # the same processes `adrenaline up` runs

    cluster = LocalCluster(model=model_dir, port=free_port())
    try:
        cluster.start()
        cluster.wait_ready()
        target = Served(cluster.url, model_dir.name, AutoTokenizer.from_pretrained(model_dir))
        return [_compare(hf, engine, target, w, repeats) for w in workloads]
    finally:
        cluster.stop()


@dataclass(frozen=True)
class Served:
    """The cluster under comparison: where it listens and how to read its text back as tokens."""

    url: str
    model: str
    tokenizer: Any


def _compare(hf: PreTrainedModel, engine: Engine, served: Served | None, w: Workload, repeats: int) -> Result:
    """One workload: transformers, the engine and (if given) the cluster, alternately, `repeats` times."""
    prompts = w.prompts(engine.spec.vocab_size)
    generated = w.num_prompts * w.output_len
    hf_generate(hf, prompts[:2], 2)  # warm-up: first-call allocations and kernel choice
    engine_generate(engine, prompts[:2], 2)
    if served:
        asyncio.run(served_generate(served.url, served.model, prompts[:2], 2))
    hf_rates, engine_rates, ratios = [], [], []
    served_rates, served_engine, served_hf = [], [], []
    same: bool | None = None
    served_same: bool | None = None
    for _ in range(repeats):
        start = time.perf_counter()
        hf_out = hf_generate(hf, prompts, w.output_len)
        hf_rates.append(generated / (time.perf_counter() - start))
        start = time.perf_counter()
        engine_out = engine_generate(engine, prompts, w.output_len)
        engine_rates.append(generated / (time.perf_counter() - start))
        ratios.append(engine_rates[-1] / hf_rates[-1])
        if w.prompt_lens[0] == w.prompt_lens[1]:
            same = engine_out == hf_out and (same is not False)
        if served:
            start = time.perf_counter()
            served_out = asyncio.run(served_generate(served.url, served.model, prompts, w.output_len))
            served_rates.append(generated / (time.perf_counter() - start))
            served_engine.append(served_rates[-1] / engine_rates[-1])
            served_hf.append(served_rates[-1] / hf_rates[-1])
            expected = [served.tokenizer.decode(t, skip_special_tokens=True) for t in engine_out]
            served_same = served_out == expected and (served_same is not False)
    hf_rate, engine_rate = statistics.median(hf_rates), statistics.median(engine_rates)
    result = Result(w.name, hf_rate, engine_rate, statistics.median(ratios), same)
    if served:
        result = dataclasses.replace(
            result,
            served_tok_s=statistics.median(served_rates),
            served_vs_engine=statistics.median(served_engine),
            served_vs_hf=statistics.median(served_hf),
            served_same_as_engine=served_same,
        )
    return result


def _yes(flag: bool | None, none: str) -> str:
    return none if flag is None else ("yes" if flag else "**no**")


def markdown(results: list[Result]) -> str:
    served = any(r.served_tok_s is not None for r in results)
    head = "| workload | transformers tok/s | engine tok/s | engine / transformers | same tokens |"
    rule = "|---|---:|---:|---:|---|"
    if served:
        head += " served tok/s | served / engine | served / transformers | served = engine |"
        rule += "---:|---:|---:|---|"
    lines = [head, rule]
    for r in results:
        line = f"| {r.workload} | {r.hf_tok_s:.0f} | {r.engine_tok_s:.0f} | {r.ratio:.2f}x | "
        line += f"{_yes(r.same_tokens, 'n/a (padded)')} |"
        if r.served_tok_s is not None:
            line += f" {r.served_tok_s:.0f} | {r.served_vs_engine:.2f}x | {r.served_vs_hf:.2f}x | "
            line += f"{_yes(r.served_same_as_engine, '-')} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="HF folder; default: the embedded default model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (1 = one core)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--served", action="store_true", help="also serve the prompts through `adrenaline up`")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or make_tiny(Path(tmp) / "default", "llama", preset="default")
        results = run(model_dir, WORKLOADS, args.repeats, args.served)
    print(f"torch threads {torch.get_num_threads()}, {args.repeats} repeats, medians")
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
