"""The whole cluster as `adrenaline up` starts it, through the official `openai` client.

Every service is its own process (nats-server, scheduler, 2 prefill, 2 decode, gateway), KV
moves over UCX, and greedy output must equal `transformers` `generate` token for token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from common.metrics import scrape_metrics
from common.natsd import free_port
from services.local_cluster import LocalCluster
from tests.unit.test_engine_sampling import OpenAIPenalties


def _wait_kv_free(cluster: LocalCluster, timeout: float = 10.0) -> None:
    """Every instance's own accounting (its heartbeat-fed gauges) back to zero blocks in use."""
    deadline = time.monotonic() + timeout
    while True:
        used = {
            name: scrape_metrics(port)["adrenaline_kv_blocks_used"]
            for name, port in cluster.metrics_ports.items()
            if not name.startswith("scheduler")
        }
        if not any(used.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"KV blocks still in use: {used}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # The default offloading policy (auto), with every pool capped at 160 tokens of KV (80 KiB of
    # the test model) so that 16 concurrent requests put the decode instances under memory
    # pressure: some are offloaded, some wait behind a 429 that the client retries.
    c = LocalCluster(
        llama_dir,
        port=free_port(),
        scale={"prefill": 2, "decode": 2},
        kv_cache_bytes=160 * 512,
        env={"ADRENALINE_THREADS": "1"},
        log_dir=tmp_path_factory.mktemp("logs"),
        prefix="e2e",
    )
    c.start()
    try:
        c.wait_ready(timeout=120)
        yield c
    finally:
        c.stop()
    assert not c.group.children, "every process is stopped"
    # Every service ran as its own NATS user (common/nats_auth.py): a subject its code uses but its
    # permissions lack shows up as a violation the server reports to that client, in its log.
    violations = [
        f"{log.name}: {line}"
        for log in sorted(c.log_dir.glob("*.log"))  # type: ignore[union-attr]
        for line in log.read_text(errors="replace").splitlines()
        if "Violation" in line
    ]
    assert not violations, "\n".join(violations)


@pytest.mark.timeout(300)
def test_concurrent_openai_requests_equal_transformers_and_offload_under_pressure(
    cluster: LocalCluster, llama_dir: Path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    words = [
        "adrenaline",
        "attention",
        "batch",
        "block",
        "cache",
        "decode",
        "executor",
        "gateway",
        "kernel",
        "layer",
        "memory",
        "prefill",
    ]
    jobs = []  # (kind, stream, payload, prompt ids)
    for i in range(16):
        text = " ".join(words[(i + j) % len(words)] for j in range(3 + i % 7))
        kind, stream = ("chat" if i % 2 else "completion"), bool(i % 4 >= 2)
        if kind == "chat":
            messages = [{"role": "user", "content": text}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            jobs.append((kind, stream, messages, list(ids)))
        else:
            jobs.append((kind, stream, text, tokenizer(text).input_ids))
    max_tokens = 20

    async def one(client: openai.AsyncOpenAI, kind: str, stream: bool, payload: object) -> str:
        # No ignore_eos: the reference `generate` stops at the end-of-sequence token, and so must we.
        common = {"model": cluster.model.name, "max_tokens": max_tokens, "temperature": 0.0}
        if kind == "chat":
            if stream:
                chunks = await client.chat.completions.create(messages=payload, stream=True, **common)  # type: ignore[arg-type]
                return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
            reply = await client.chat.completions.create(messages=payload, **common)  # type: ignore[arg-type]
            return reply.choices[0].message.content or ""
        if stream:
            chunks = await client.completions.create(prompt=payload, stream=True, **common)  # type: ignore[arg-type]
            return "".join([c.choices[0].text async for c in chunks if c.choices])
        completion = await client.completions.create(prompt=payload, **common)  # type: ignore[arg-type]
        return completion.choices[0].text

    async def run_all() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=10)
        return await asyncio.gather(*(one(client, kind, stream, payload) for kind, stream, payload, _ in jobs))

    texts = asyncio.run(run_all())
    for (kind, stream, _, ids), text in zip(jobs, texts, strict=True):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids) :]
        assert text == tokenizer.decode(ref, skip_special_tokens=True), (kind, stream)
    scheduler = scrape_metrics(cluster.metrics_ports["scheduler-0"])
    assert scheduler['adrenaline_scheduler_submissions_total{status="200"}'] >= 16
    assert scheduler['adrenaline_scheduler_instances{role="decode"}'] == 2
    for name, port in cluster.metrics_ports.items():
        if name.startswith(("prefill", "decode")):
            direction = "send" if name.startswith("prefill") else "recv"
            assert scrape_metrics(port)[f'adrenaline_kv_transfer_bytes_total{{direction="{direction}"}}'] > 0, name
    offloaded = sum(
        v for k, v in scheduler.items() if k.startswith('adrenaline_scheduler_offload_decisions_total{offloaded="true"')
    )
    assert offloaded > 0, {k: v for k, v in scheduler.items() if "offload" in k}
    received = [
        scrape_metrics(port).get('adrenaline_kv_transfer_bytes_total{direction="recv"}', 0.0)
        for name, port in cluster.metrics_ports.items()
        if name.startswith("executor")
    ]
    assert len(received) == 2 and sum(received) > 0
    _wait_kv_free(cluster)


@pytest.mark.timeout(120)
def test_a_client_that_disconnects_mid_stream_leaves_no_kv_anywhere(cluster: LocalCluster) -> None:
    body = {
        "model": cluster.model.name,
        "prompt": "decode batch",
        "max_tokens": 120,  # the pools hold 160 tokens; still far more than the chunks read below
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    for _ in range(3):
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{cluster.url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [next(lines) for _ in range(6)]  # a few chunks, then hang up
            assert any(line.startswith("data: ") for line in received)
    _wait_kv_free(cluster)


@pytest.mark.timeout(60)
def test_errors_through_the_cluster(cluster: LocalCluster) -> None:
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=cluster.model.name, prompt="x", temperature=-1)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    assert httpx.get(f"{cluster.url}/health").status_code == 200


@pytest.mark.timeout(300)
def test_sampling_extensions_n_and_batches_through_the_cluster(cluster: LocalCluster, llama_dir: Path) -> None:
    """Processors, stop token ids, seeded `n` and a batch through every service: greedy output equals
    transformers' `generate` with its own processors, and choice j of a seeded request is the
    request seeded with seed + j, whichever instances served each."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=10)
    model, prompts = cluster.model.name, ["block cache decode block cache", "gateway kernel layer memory"]

    def reference(prompt: str, max_new: int, processors: list[Any], **kwargs: Any) -> list[int]:
        ids = tokenizer(prompt).input_ids
        out = hf.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new,
            do_sample=False,
            logits_processor=LogitsProcessorList(processors),
            **kwargs,
        )
        return list(out[0, len(ids) :].tolist())

    for prompt in prompts:
        n_prompt = len(tokenizer(prompt).input_ids)
        got = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            presence_penalty=0.9,
            frequency_penalty=0.7,
            logit_bias={"300": 4.0},
            extra_body={"repetition_penalty": 1.3},
        )
        expected = reference(
            prompt,
            16,
            [
                SequenceBiasLogitsProcessor([[[300], 4.0]]),
                RepetitionPenaltyLogitsProcessor(1.3),
                OpenAIPenalties(n_prompt, 0.7, 0.9),
            ],
        )
        assert got.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        free = reference(prompt, 16, [])
        stop = free[1]
        held = client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            extra_body={"stop_token_ids": [stop], "min_tokens": 5},
        )
        expected = reference(prompt, 16, [], eos_token_id=[stop, tokenizer.eos_token_id], min_new_tokens=5)
        ended_on_stop = stop in expected[5:]
        if ended_on_stop:  # the stop token's text is left out, as vLLM does
            expected = expected[: expected.index(stop, 5)]
        assert held.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
        assert held.choices[0].finish_reason == ("stop" if ended_on_stop else "length")
    batch = client.completions.create(model=model, prompt=prompts, max_tokens=10, temperature=0)
    assert [c.text for c in batch.choices] == [
        tokenizer.decode(reference(p, 10, []), skip_special_tokens=True) for p in prompts
    ]
    seeded = client.completions.create(model=model, prompt=prompts[0], max_tokens=12, n=3, seed=5, temperature=1.0)
    assert [c.index for c in seeded.choices] == [0, 1, 2]
    texts = [c.text for c in seeded.choices]
    assert len(set(texts)) > 1
    for j in range(3):
        alone = client.completions.create(model=model, prompt=prompts[0], max_tokens=12, seed=5 + j, temperature=1.0)
        assert alone.choices[0].text == texts[j]
    _wait_kv_free(cluster)


@pytest.mark.timeout(120)
def test_prompt_logprobs_and_bad_words_through_the_cluster(cluster: LocalCluster, llama_dir: Path) -> None:
    """vLLM's `prompt_logprobs` as the prefill instance computed them and the gateway shaped them: each
    prompt token's logprob and its 5 likeliest alternatives equal log_softmax of transformers' logits
    on the prompt; so do `echo`'s with `logprobs` (OpenAI's legacy shape, the first token's null).
    Greedy output with `bad_words` equals `generate` banning the words' token sequences as vLLM
    makes them (the word, and with a leading space where that is another first token)."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    model, prompt = cluster.model.name, "block cache decode block cache"
    ids = tokenizer(prompt).input_ids
    body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "prompt_logprobs": 5}
    response = httpx.post(f"{cluster.url}/v1/completions", json=body, timeout=30).json()
    shaped = response["choices"][0]["prompt_logprobs"]
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
    values, indices = expected.topk(5, dim=-1)
    assert shaped[0] is None and len(shaped) == len(ids)
    for j, token in enumerate(ids[1:]):
        position = shaped[j + 1]
        assert position[str(token)]["logprob"] == pytest.approx(float(expected[j, token]), abs=1e-4)
        assert [position[str(t)]["rank"] for t in indices[j].tolist()] == [1, 2, 3, 4, 5]
        got = [position[str(t)]["logprob"] for t in indices[j].tolist()]
        assert got == pytest.approx(values[j].tolist(), abs=1e-4)
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=10)
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0, echo=True, logprobs=0)
    legacy = echoed.choices[0].logprobs
    assert legacy is not None and legacy.token_logprobs is not None and legacy.tokens is not None
    assert legacy.tokens[: len(ids)] == [tokenizer.decode([t]) for t in ids]
    assert legacy.token_logprobs[0] is None
    gathered = expected.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert legacy.token_logprobs[1 : len(ids)] == pytest.approx(gathered, abs=1e-4)
    assert echoed.choices[0].text.startswith(prompt) and len(legacy.token_logprobs) == len(ids) + 2

    free = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
    token = next(t for t in free[2:] if tokenizer.decode([t]).isalpha())  # a whole word, no leading space
    word = tokenizer.decode([token])
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    banned = [encode(word)]
    if encode(" " + word)[0] != banned[0][0] and len(encode(" " + word)) == len(banned[0]):
        banned.append(encode(" " + word))
    assert [token] in banned  # the output must change for this to mean anything
    assert all(ids[-(len(b) - 1) :] != b[:-1] for b in banned if len(b) > 1)  # no word straddles the prompt's end
    got = client.completions.create(
        model=model, prompt=prompt, max_tokens=12, temperature=0, extra_body={"bad_words": [word]}
    )
    reference = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, bad_words_ids=banned)
    assert got.choices[0].text == tokenizer.decode(reference[0, len(ids) :], skip_special_tokens=True)
    assert got.choices[0].text != tokenizer.decode(free, skip_special_tokens=True)
    _wait_kv_free(cluster)


@pytest.mark.timeout(120)
def test_the_prometheus_configuration_of_a_run_scrapes_every_service(cluster: LocalCluster) -> None:
    import yaml

    path = cluster.write_prometheus_config()
    assert path is not None
    jobs = {
        job["job_name"]: job["static_configs"][0]["targets"]
        for job in yaml.safe_load(path.read_text())["scrape_configs"]
    }
    assert {role: len(targets) for role, targets in jobs.items()} == {
        "scheduler": 1, "prefill": 2, "attention-executor": 2, "decode": 2, "gateway": 1,
    }  # fmt: skip
    for role, targets in jobs.items():
        for target in targets:
            body = httpx.get(f"http://{target}/metrics", timeout=10).text
            assert "vllm:" in body or "adrenaline_" in body, (role, target)
            health = httpx.get(f"http://{target}/health", timeout=10)  # readiness, as a probe asks
            assert health.status_code == 200, (role, target, health.text)
