"""From an OpenAI request body to what the backend runs: prompt token ids and validated `Sampling`.

Everything a client can get wrong is refused here, before anything is submitted, as a 400 that
names the parameter: the backend would refuse most of it too, but only after a round trip and
with a less useful message.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Annotated, Any, get_args, get_origin

import msgspec
from litestar import Request

from common.errors import InvalidRequestError
from common.messages import Sampling
from common.sampling import SamplingParams, to_wire
from services.gateway.errors import APIError, invalid
from services.gateway.openai_types import CHAT_ROLES, ChatMessage, CompletionRequest, SamplingFields

DEFAULT_MAX_TOKENS = 16


@dataclass(frozen=True)
class Prompt:
    """One prompt of a completion request: its token ids, and its text when the client sent text."""

    token_ids: list[int]
    text: str | None


class PromptBuilder:
    """Tokenizes prompts and checks requests against one model's tokenizer and context length."""

    @staticmethod
    def of(request: Request[Any, Any, Any]) -> PromptBuilder:
        """The app's builder (kept in its state, not a global, so one process can hold several apps)."""
        prompts: PromptBuilder = request.app.state.prompts
        return prompts

    def __init__(self, tokenizer: Any, served_model_name: str, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            message = f"The model `{model}` does not exist; this server serves `{self.served_model_name}`."
            raise APIError(404, message, param="model", code="model_not_found")

    def completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        """The request's prompts: one (a string or a list of token ids) or a batch (a list of either kind)."""
        prompt: Any = req.prompt
        if isinstance(prompt, str):
            return [self._text_prompt(prompt, "prompt")]
        if not prompt:
            raise invalid("prompt", "prompt must not be empty")
        if all(isinstance(p, str) for p in prompt):
            return [self._text_prompt(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        if all(isinstance(p, list) for p in prompt):
            return [self._token_prompt(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        if any(isinstance(p, str | list) for p in prompt):
            raise invalid("prompt", "a batch of prompts must be all strings or all lists of token ids")
        return [self._token_prompt(prompt, "prompt")]

    def _text_prompt(self, text: str, param: str) -> Prompt:
        if not text:
            raise invalid(param, f"{param} must not be empty")
        return Prompt(list(self.tokenizer(text).input_ids), text)

    def _token_prompt(self, ids: list[Any], param: str) -> Prompt:
        if not ids:
            raise invalid(param, f"{param} must not be empty")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise invalid(param, f"{param} must be a string or a list of token ids")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid(param, f"{param}: token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        return Prompt(list(ids), None)

    def chat_prompt(
        self, messages: list[ChatMessage], add_generation_prompt: bool = True, continue_final_message: bool = False
    ) -> list[int]:
        """The chat template's prompt. `continue_final_message` (vLLM's) leaves the last message, which
        must be the assistant's, open for the model to go on with, so it excludes `add_generation_prompt`."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid("messages", "this model's tokenizer has no chat template; use /v1/completions instead")
        if continue_final_message and add_generation_prompt:
            raise invalid(
                "continue_final_message",
                "continue_final_message: needs add_generation_prompt set to false (the assistant's last message "
                "is continued, not a new turn opened)",
            )
        if continue_final_message and messages[-1].role != "assistant":
            raise invalid(
                "continue_final_message",
                f"continue_final_message: the last message must be the assistant's, not `{messages[-1].role}`",
            )
        conversation = []
        for i, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise invalid(
                    f"messages[{i}].role",
                    f"messages[{i}].role: `{message.role}` is not a role this server takes: use one of "
                    f"{', '.join(CHAT_ROLES)} (tool calling is not implemented, so there are no tool messages)",
                )
            content = message.content
            if isinstance(content, list):
                if any(part.type != "text" or part.text is None for part in content):
                    raise invalid(f"messages[{i}].content", "only text content parts are supported")
                content = "".join(part.text or "" for part in content)
            turn = {"role": CHAT_ROLES[message.role], "content": content or ""}
            if message.name is not None:
                turn["name"] = message.name
            conversation.append(turn)
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
            )
        except Exception as exc:  # jinja raises for templates that refuse a conversation (e.g. roles out of order)
            raise invalid("messages", f"the chat template refused these messages: {exc}") from exc
        # The template already wrote any special tokens it wants (as HF's own tokenize=True does).
        ids: list[int] = self.tokenizer(text, add_special_tokens=False).input_ids
        if not ids:
            raise invalid("messages", "the messages make an empty prompt")
        return ids

    def sampling(self, req: SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> Sampling:
        """Validated sampling parameters; `max_tokens` defaults to 16, clamped to what the context leaves."""
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise invalid(
                "prompt",
                f"This model's maximum context length is {self.max_model_len} tokens; the prompt has {prompt_len}.",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, room)
        elif isinstance(max_tokens, int) and max_tokens > room:
            raise invalid(
                "max_tokens",
                f"This model's maximum context length is {self.max_model_len} tokens; you asked for {max_tokens} "
                f"tokens after a prompt of {prompt_len}.",
                code="context_length_exceeded",
            )
        stop_token_ids = tuple(req.stop_token_ids or ())
        self._check_token_ids("stop_token_ids", stop_token_ids)
        bad_words = self._bad_words(req.bad_words or [])
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None else req.top_k,
                seed=req.seed,
                stop_token_ids=stop_token_ids,
                ignore_eos=bool(req.ignore_eos),
                logprobs=logprobs,
                logit_bias=self._logit_bias(req.logit_bias),
                min_tokens=req.min_tokens or 0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                frequency_penalty=req.frequency_penalty or 0.0,
                presence_penalty=req.presence_penalty or 0.0,
                min_p=req.min_p or 0.0,
                bad_words=bad_words,
                prompt_logprobs=req.prompt_logprobs_wanted(),
            )
        except InvalidRequestError as exc:
            param = "max_tokens" if exc.field == "max_new_tokens" else exc.field
            raise invalid(param, f"{param}: {exc.message}") from None
        return to_wire(params)

    def _logit_bias(self, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's `{"token id": bias}` as (id, bias) pairs; a key that is no token id of this model is a 400."""
        pairs = []
        for key, value in (bias or {}).items():
            token = int(key) if key.isascii() and key.isdigit() and len(key) <= 10 else None
            if token is None or token >= self.vocab_size:
                raise invalid(
                    "logit_bias", f"logit_bias: keys must be token ids in [0, {self.vocab_size}); got {key!r}"
                )
            pairs.append((token, float(value)))
        return tuple(pairs)

    def _bad_words(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """vLLM's `bad_words` as the token sequences it bans (`SamplingParams.update_from_tokenizer`):
        each word without its leading spaces, and with one leading space where that tokenizes to
        another first token in as many tokens (a word in mid-text, for tokenizers that do not
        already add the space themselves)."""
        sequences: list[tuple[int, ...]] = []
        for word in words:
            plain = tuple(self.tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            if not plain or not spaced:
                raise invalid("bad_words", f"bad_words: {word!r} makes no token")
            sequences.append(plain)
            if spaced[0] != plain[0] and len(spaced) == len(plain):
                sequences.append(spaced)
        self._check_token_ids("bad_words", tuple(t for s in sequences for t in s))
        return tuple(sequences)

    def _check_token_ids(self, param: str, ids: tuple[int, ...]) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid(param, f"{param}: token ids must be in [0, {self.vocab_size}); got {bad[:5]}")


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def refuse_unsupported(body: msgspec.Struct, where: str = "") -> None:
    """Refuse, by name, a field marked `unsupported` that holds anything but a neutral value.

    Nested structs (messages, their content parts, stream_options) are searched too, so that no
    request asks for something we would silently leave out.
    """
    for name, (accepted, how, same_as) in _unsupported_fields(type(body)).items():
        value = getattr(body, name)
        if value not in accepted and (same_as is None or value != (getattr(body, same_as) or 1)):
            raise invalid(f"{where}{name}", f"{where}{name}: this server does not support `{name}`: {how}")
    for name in body.__struct_fields__:
        value = getattr(body, name)
        if isinstance(value, msgspec.Struct):
            refuse_unsupported(value, f"{where}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, msgspec.Struct):
                    refuse_unsupported(item, f"{where}{name}[{i}].")


@functools.cache
def _unsupported_fields(struct: type[msgspec.Struct]) -> dict[str, tuple[tuple[Any, ...], str, str | None]]:
    """The fields of `struct` that `openai_types.unsupported` marks: name -> (accepted values, how to
    comply, the field whose value is accepted too)."""
    marked = {}
    for field in msgspec.structs.fields(struct):
        metadata = get_args(field.type)[1:] if get_origin(field.type) is Annotated else ()
        for meta in metadata:
            if isinstance(meta, msgspec.Meta) and meta.extra and "accepted" in meta.extra:
                marked[field.name] = (meta.extra["accepted"], meta.extra["how"], meta.extra["same_as"])
    return marked
