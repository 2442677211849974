"""What several end-to-end tests need alike: transformers' greedy text to hold the cluster to, a
round of greedy completions through the official client, and a process's /proc state."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import openai
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def transformers_texts(llama_dir: Path, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """transformers' greedy continuation of each prompt, as text (special tokens skipped)."""
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    hf = AutoModelForCausalLM.from_pretrained(llama_dir)
    texts = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids) :]
        texts.append(str(tokenizer.decode(out, skip_special_tokens=True)))
    return texts


def greedy_completions(url: str, model: str, prompts: Sequence[str], max_tokens: int, timeout: float) -> list[str]:
    """One greedy completion per prompt through the gateway at `url`, sent concurrently."""

    async def round_() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout)

        async def one(prompt: str) -> str:
            reply = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0)
            return reply.choices[0].text

        async with client:
            return list(await asyncio.gather(*(one(p) for p in prompts)))

    return asyncio.run(round_())


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, parent, ...), or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()
