"""`/tokenize`, `/detokenize` and `/version`, as vLLM serves them (tools built for vLLM call them).

They use the same tokenizer and chat template as the generation endpoints, so `/tokenize` shows
exactly the token ids a completion or chat request would be served with, and they sit behind
the same API keys. Nothing here reaches the cluster: the gateway answers alone.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from litestar import Request, get, post

from services.gateway import openai_types as oa
from services.gateway.errors import invalid
from services.gateway.prompts import PromptBuilder, refuse_unsupported


@post("/tokenize", status_code=200)
async def tokenize(request: Request[Any, Any, Any], data: oa.TokenizeRequest) -> oa.TokenizeResponse:
    prompts = PromptBuilder.of(request)
    prompts.check_model(data.model)
    refuse_unsupported(data)  # a message's tool calls, say: what chat would refuse, this refuses too
    if (data.prompt is None) == (data.messages is None):
        raise invalid("prompt", "send either `prompt` (text) or `messages` (a chat), not both or neither")
    if data.messages is not None:
        ids = prompts.chat_prompt(
            data.messages,
            add_generation_prompt=data.add_generation_prompt,
            continue_final_message=data.continue_final_message,
        )
    else:
        ids = prompts.tokenizer(data.prompt, add_special_tokens=data.add_special_tokens).input_ids
    return oa.TokenizeResponse(count=len(ids), max_model_len=prompts.max_model_len, tokens=list(ids))


@post("/detokenize", status_code=200)
async def detokenize(request: Request[Any, Any, Any], data: oa.DetokenizeRequest) -> oa.DetokenizeResponse:
    prompts = PromptBuilder.of(request)
    prompts.check_model(data.model)
    bad = [t for t in data.tokens if not 0 <= t < prompts.vocab_size]
    if bad:
        raise invalid("tokens", f"token ids must be in [0, {prompts.vocab_size}); got {bad[:5]}")
    return oa.DetokenizeResponse(prompt=prompts.tokenizer.decode(data.tokens))


@get("/version")
async def server_version() -> oa.VersionResponse:
    try:
        return oa.VersionResponse(version=version("adrenaline"))
    except PackageNotFoundError:  # run from a source tree that was never installed
        return oa.VersionResponse(version="unknown")
