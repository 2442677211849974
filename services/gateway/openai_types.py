"""Request and response bodies of the OpenAI API we serve, as msgspec structs.

Litestar validates request bodies against these (a wrong type is a 400 naming the field) and
documents both directions in the generated OpenAPI schema. Unknown request fields are ignored,
as OpenAI's own clients send fields we have no use for (`user`, `metadata`...); fields we cannot
honour (`n` > 1, `echo`) are declared so that they can be refused by name.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False  # send a last chunk with token counts before [DONE]


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields both endpoints share. None means "the default", as OpenAI clients may send explicit nulls."""

    model: str | None = None
    max_tokens: int | None = None  # default 16; clamped to the context when not given
    temperature: float | None = None  # default 1.0; 0 is greedy
    top_p: float | None = None
    top_k: int | None = None  # extension: 0 or -1 keeps all tokens
    seed: int | None = None
    stop: str | list[str] | None = None  # stop strings, matched in the decoded text
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extension: generate past the end-of-sequence token
    n: int | None = 1  # only 1 is served
    user: str | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[Any]  # a string, or a list of token ids; a batch of prompts is refused
    logprobs: int | None = None  # 0-20: the chosen token's logprob plus this many alternatives
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None  # 0-20, needs logprobs=true


# ---- responses ---------------------------------------------------------------------------------
class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None


class ChatMessageOut(msgspec.Struct):
    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None


class ModelCard(msgspec.Struct):
    id: str
    created: int
    max_model_len: int
    object: Literal["model"] = "model"
    owned_by: str = "adrenaline"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """Every error the gateway answers has this body."""

    error: ErrorDetail


def now() -> int:
    return int(time.time())


def sse(payload: Any) -> bytes:
    """One server-sent event exactly as OpenAI frames it: `data: <json>` and a blank line."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
