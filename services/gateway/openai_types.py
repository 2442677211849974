"""Request and response bodies of the OpenAI API we serve, as msgspec structs, with the limits on requests.

Litestar validates request bodies against these with msgspec (a wrong type or a value out of range
is a 400 naming the field), and msgspec's JSON Schema of these same types is the OpenAPI document's
(`services/gateway/openapi.py`), so what is declared here is what is enforced and what is documented.
Checks made in code (prompts.py) are stated here too, as schema-only keywords (`_schema`), and
values that depend on the served model (its name, vocabulary, context) as `per_model` markers that
the document fills in. A request field we do not know is refused by name, as OpenAI itself does, rather than
silently ignored: a client that sends one expects an effect we would not give. Fields OpenAI
defines but we cannot honour (`suffix`, `tools`...) are declared with `unsupported(...)`:
their neutral values, which clients send, pass; anything else is refused by name. Fields that
only inform (`user`, `metadata`, `prompt_cache_key`...) are accepted and have no effect. vLLM's
sampling extensions (`top_k`, `min_p`, `min_tokens`, `repetition_penalty`, `stop_token_ids`,
`bad_words`, `prompt_logprobs`...) are accepted as body fields, as vLLM takes them (the openai
client's `extra_body`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from common.sampling_checks import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_LOGPROBS,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
)

# ---- limits on requests: each stated once, enforced by the types below and shown in /schema ----
MAX_BODY_BYTES = 10_000_000  # a larger body is a 413 before it is parsed (Litestar's default, made explicit)
MAX_STOP_STRINGS = 16  # a stop list longer than this is refused (`stop`)
MAX_STOP_LENGTH = 256  # characters per stop string; every step searches the text for each of them
MAX_TOP_K = 2**31 - 1  # above any vocabulary (where top_k keeps every token, as 0 does); an absurd one is a 400
MAX_CHOICES = 128  # choices per request: n, times the prompts of a batch; each is a request to the cluster
MAX_STOP_TOKEN_IDS = 256  # every generated token is looked up among them
MAX_BAD_WORDS = 64  # vLLM's `bad_words`: each makes up to two banned token sequences
MAX_BAD_WORD_LENGTH = 100  # characters: within MAX_BAD_WORD_TOKENS (sampling_checks) at 4 byte tokens a character
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
"""The roles a chat message may have, and the role the chat template sees for each: `developer` is
OpenAI's newer name for `system`, which templates know. No `tool` role: tool calling is not implemented."""


def unsupported(*accepted: Any, same_as: str | None = None) -> Meta:
    """Marks a field OpenAI defines but this server does not implement.

    A request may leave it out, send null, or send one of `accepted` (the field's neutral values,
    which clients send as a matter of course), or with `same_as` the value of that other field
    (which counts as 1 when null: `n`'s default); `prompts.refuse_unsupported` refuses anything else
    by name. The same words, and the accepted values as an `enum`, document the field in the schema
    (a `same_as` rule is one across fields: the words state it).
    """
    values = " or ".join(msgspec.json.encode(v).decode() for v in accepted)
    how = f"leave it out or send {values}" if accepted else "leave it out"
    if same_as is not None:
        how = f"leave it out or send the value of `{same_as}`"
    return Meta(
        description=f"Not supported by this server: {how}.",
        extra={"accepted": (None, *accepted), "how": how, "same_as": same_as},
        extra_json_schema={} if same_as is not None else {"enum": [None, *accepted]},
    )


def _schema(description: str | None = None, **keywords: Any) -> Meta:
    """JSON Schema keywords for a check made in code rather than by msgspec: they document, they do not validate."""
    return Meta(description=description, extra_json_schema=keywords)


PER_MODEL = "x-per-model"
"""A schema-only marker that `openapi.py` replaces with the served model's value: "model" (its name),
"token_id" (below the vocabulary size), "token_key" (a token id written as a string), "context"
(at most the context length less one token), "prompt_tokens" (a token list that fits the context)."""


def per_model(kind: str, description: str | None = None, **keywords: Any) -> Meta:
    return _schema(description, **keywords, **{PER_MODEL: kind})


StopString = Annotated[str, Meta(max_length=MAX_STOP_LENGTH)]
Stop = Annotated[
    StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] | None,
    Meta(description=f"At most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_LENGTH} characters each"),
]
TopK = Annotated[int, Meta(ge=-1, le=MAX_TOP_K)]
Logprobs = Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)]
Temperature = Annotated[float, Meta(ge=0, le=MAX_TEMPERATURE)]
_FITS = "At most what the context leaves after the prompt (else a 400 `context_length_exceeded`)"
TokenCount = Annotated[int, Meta(ge=1), per_model("context", _FITS)]
TopP = Annotated[float, _schema(exclusiveMinimum=0, maximum=1)]  # checked by SamplingParams
Seed = Annotated[int, _schema(minimum=0, maximum=2**63 - 1)]  # checked by SamplingParams
TokenId = Annotated[int, per_model("token_id", minimum=0)]  # checked against the vocabulary in prompts.py
Penalty = Annotated[float, Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)]
Bias = Annotated[float, Meta(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]
NOT_SPACE = r"[^\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
"""A character that Python's `str.isspace` (so `str.lstrip`, and `\\s` of its regexes) does not take for a
space: spelled out, because JSON Schema's (ECMA-262) `\\s` is another set."""
BadWord = Annotated[str, Meta(min_length=1, max_length=MAX_BAD_WORD_LENGTH, pattern=NOT_SPACE)]
BadWords = Annotated[
    Annotated[list[BadWord], Meta(max_length=MAX_BAD_WORDS)] | None,
    Meta(
        description=f"vLLM's: at most {MAX_BAD_WORDS} words (each with a character that is not a space, at most "
        f"{MAX_BAD_WORD_LENGTH} characters) the output never contains: each word's tokens, with and without a "
        "leading space, are banned as sequences"
    ),
]
LogitBias = Annotated[
    Annotated[dict[str, Bias], Meta(max_length=MAX_LOGIT_BIAS_TOKENS), per_model("token_key")] | None,
    Meta(description="Token id (as a string) -> bias added to its logit"),
]
_TOKEN_ID = {"type": "integer", "minimum": 0, PER_MODEL: "token_id"}
_TOKENS = {"type": "array", "items": _TOKEN_ID, "minItems": 1, PER_MODEL: "prompt_tokens"}
PROMPT_SCHEMA = {
    "anyOf": [
        {"type": "string", "minLength": 1},
        _TOKENS,
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_CHOICES},
        {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": MAX_CHOICES},
    ]
}
"""What prompts.py takes: a non-empty string or token list, or a batch of one kind of them. The document
states it in place of msgspec's schema of the type, which is wider (and which msgspec lets no keyword override)."""


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False  # send a last chunk with token counts before [DONE]
    include_obfuscation: Annotated[bool | None, unsupported(False)] = None  # chunks are never padded


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both endpoints share. None means "the default", as OpenAI clients may send explicit nulls."""

    model: Annotated[str | None, per_model("model")] = None  # another model is a 404
    max_tokens: TokenCount | None = None  # default 16; clamped to the context when not given
    temperature: Temperature | None = None  # default 1.0; 0 is greedy
    top_p: TopP | None = None
    top_k: TopK | None = None  # extension: 0 or -1 keeps all tokens
    min_p: Annotated[float, Meta(ge=0, le=1)] | None = None  # extension: no token under min_p x the likeliest's
    seed: Seed | None = None
    stop: Stop = None  # stop strings, matched in the decoded text
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # extension: generate past the end-of-sequence token
    n: Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None = 1  # samples per prompt
    presence_penalty: Penalty | None = None  # over output tokens, as OpenAI defines it
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias = None
    user: str | None = None  # informational
    # vLLM's extensions
    repetition_penalty: Annotated[float, Meta(gt=0, le=MAX_REPETITION_PENALTY)] | None = None  # prompt and output
    min_tokens: Annotated[int, Meta(ge=0)] | None = None  # no stop before this many (at most max_tokens)
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    bad_words: BadWords = None
    include_stop_str_in_output: bool | None = False  # keep the stop string (or stop token's text) in the text
    skip_special_tokens: bool | None = True  # leave special tokens out of the text

    def prompt_logprobs_wanted(self) -> int | None:
        """How many alternatives the prefill instance reports with each prompt token's logprob
        (`Sampling.prompt_logprobs`); None, the default, costs nothing."""
        return None


class CompletionRequest(SamplingFields, kw_only=True):
    """Rules across fields, checked in code (a 400 naming the field): the prompt's tokens plus `max_tokens`
    fit the model's context (else `context_length_exceeded`); `min_tokens` <= `max_tokens` (16 when not
    given); `n` times the prompts of a batch <= MAX_CHOICES (128); `best_of`, if given, equals `n`."""

    # A string, a list of token ids, or a batch of either (a list of strings, a list of token lists);
    # nothing nested deeper. Not empty, and a batch of one kind (prompts.py checks it).
    prompt: str | list[int | str | list[int]]  # documented as PROMPT_SCHEMA
    logprobs: Logprobs | None = None  # the chosen token's logprob plus this many alternatives
    echo: bool | None = False  # the prompt's text before each choice's; with logprobs, the prompt's logprobs too
    # vLLM's: each choice's `prompt_logprobs`, every prompt token's logprob with this many alternatives
    prompt_logprobs: Logprobs | None = None
    # best_of > n would rank best_of samples by cumulative logprob: not implemented, so only n's value
    best_of: Annotated[Annotated[int, Meta(ge=1, le=MAX_CHOICES)] | None, unsupported(same_as="n")] = None
    suffix: Annotated[str | None, unsupported("")] = None

    def prompt_logprobs_wanted(self) -> int | None:
        """vLLM's `prompt_logprobs`, else, with `echo`, `logprobs` (OpenAI's prompt logprobs), as vLLM
        decides: the echoed prompt's alternatives are at most as many as either asks for."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Only text parts are served (prompts.py refuses the others, and a text part without text); the
    other kinds' payloads are declared so that they are refused by name rather than as unknown fields."""

    type: Annotated[str, _schema(enum=["text"])]
    text: str | None = None
    image_url: Annotated[Any, unsupported()] = None
    input_audio: Annotated[Any, unsupported()] = None
    file: Annotated[Any, unsupported()] = None
    refusal: Annotated[Any, unsupported()] = None


class ChatMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Annotated[str, _schema(enum=list(CHAT_ROLES))]  # one of CHAT_ROLES (prompts.py checks it)
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[Any] | None, unsupported([])] = None
    tool_call_id: Annotated[str | None, unsupported()] = None
    function_call: Annotated[Any, unsupported()] = None
    refusal: Annotated[str | None, unsupported()] = None
    audio: Annotated[Any, unsupported()] = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """Rules across fields, checked in code (a 400 naming the field): the prompt's tokens plus
    `max_completion_tokens` (or `max_tokens`) fit the model's context (else `context_length_exceeded`);
    `min_tokens` <= that (16 when not given); `top_logprobs` needs `logprobs: true`;
    `continue_final_message` needs `add_generation_prompt: false` and the assistant's message last."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: TokenCount | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: Logprobs | None = None  # needs logprobs=true
    add_generation_prompt: bool | None = True  # vLLM's: end the prompt with the assistant's turn opening
    continue_final_message: bool | None = False  # vLLM's: continue the last (assistant's) message instead
    tools: Annotated[list[Any] | None, unsupported([])] = None
    tool_choice: Annotated[str | dict[str, Any] | None, unsupported("none", "auto")] = None
    parallel_tool_calls: bool | None = None  # only means something with tools
    functions: Annotated[list[Any] | None, unsupported([])] = None
    function_call: Annotated[str | dict[str, Any] | None, unsupported("none", "auto")] = None
    response_format: Annotated[dict[str, Any] | None, unsupported({"type": "text"})] = None
    store: Annotated[bool | None, unsupported(False)] = None
    service_tier: Annotated[str | None, unsupported("auto", "default")] = None
    modalities: Annotated[list[str] | None, unsupported(["text"])] = None
    audio: Annotated[Any, unsupported()] = None
    prediction: Annotated[Any, unsupported()] = None
    reasoning_effort: Annotated[str | None, unsupported()] = None
    verbosity: Annotated[str | None, unsupported("medium")] = None
    web_search_options: Annotated[Any, unsupported()] = None
    metadata: dict[str, str] | None = None  # informational
    prompt_cache_key: str | None = None  # informational: the prefix cache needs no hint
    safety_identifier: str | None = None  # informational


# ---- responses ---------------------------------------------------------------------------------
class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptLogprob(msgspec.Struct):
    """vLLM's entry of a choice's `prompt_logprobs`: a token's logprob at a prompt position, its rank
    there (1 is the likeliest; null for the prompt's own token when it is not among the alternatives
    asked for: only those are ranked), and its text."""

    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    # vLLM's, when asked: per prompt token (the first has none: null), its entry and the alternatives'
    # by token id; in a stream, in each choice's first chunk
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


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


# ---- tokenizer utilities (vLLM's /tokenize, /detokenize, /version) ---------------------------
class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Either `prompt` (text, as /v1/completions tokenizes it) or `messages` (as /v1/chat/completions
    does, through the chat template), not both. `continue_final_message` needs `add_generation_prompt:
    false` and the assistant's message last."""

    model: Annotated[str | None, per_model("model")] = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage] | None, _schema(minItems=1)] = None
    add_special_tokens: bool = True  # prompt only: the tokenizer's own BOS/EOS
    add_generation_prompt: bool = True  # messages only: end with the assistant's turn opening
    continue_final_message: bool = False  # messages only: leave the last (assistant's) message open


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    tokens: list[TokenId]
    model: Annotated[str | None, per_model("model")] = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


class VersionResponse(msgspec.Struct):
    version: str


def now() -> int:
    return int(time.time())


def sse(payload: Any) -> bytes:
    """One server-sent event exactly as OpenAI frames it: `data: <json>` and a blank line."""
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
