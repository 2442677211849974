"""From an OpenAI request body to what the backend runs: prompt token ids and validated `Sampling`.

Everything a client can get wrong is refused here, before anything is submitted, as a 400 that
names the parameter: the backend would refuse most of it too, but only after a round trip and
with a less useful message.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, get_args, get_origin

import msgspec
from litestar import Request

from common.errors import InvalidRequestError
from common.messages import Sampling
from common.sampling import SamplingParams, to_wire
from services.gateway.errors import APIError, invalid
from services.gateway.openai_types import CHAT_ROLES, ChatMessage, CompletionRequest, SamplingFields

DEFAULT_MAX_TOKENS = 16


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

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt: Any = req.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one is one prompt
        if isinstance(prompt, str):
            if not prompt:
                raise invalid("prompt", "prompt must not be empty")
            ids: list[int] = self.tokenizer(prompt).input_ids
            return ids
        if not prompt:
            raise invalid("prompt", "prompt must not be empty")
        if any(isinstance(p, str | list) for p in prompt):
            raise invalid("prompt", "a batch of prompts is not supported: send one prompt per request")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise invalid("prompt", "prompt must be a string or a list of token ids")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise invalid("prompt", f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        return list(prompt)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise invalid("messages", "this model's tokenizer has no chat template; use /v1/completions instead")
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
                conversation, add_generation_prompt=add_generation_prompt, tokenize=False
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
        try:
            params = SamplingParams(
                max_new_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None else req.top_k,
                seed=req.seed,
                ignore_eos=bool(req.ignore_eos),
                logprobs=logprobs,
            )
        except InvalidRequestError as exc:
            param = "max_tokens" if exc.field == "max_new_tokens" else exc.field
            raise invalid(param, f"{param}: {exc.message}") from None
        return to_wire(params)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else [s for s in stop if s]


def refuse_unsupported(body: msgspec.Struct, where: str = "") -> None:
    """Refuse, by name, a field marked `unsupported` that holds anything but a neutral value.

    Nested structs (messages, their content parts, stream_options) are searched too, so that no
    request asks for something we would silently leave out.
    """
    for name, (accepted, how) in _unsupported_fields(type(body)).items():
        if getattr(body, name) not in accepted:
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
def _unsupported_fields(struct: type[msgspec.Struct]) -> dict[str, tuple[tuple[Any, ...], str]]:
    """The fields of `struct` that `openai_types.unsupported` marks: name -> (accepted values, how to comply)."""
    marked = {}
    for field in msgspec.structs.fields(struct):
        metadata = get_args(field.type)[1:] if get_origin(field.type) is Annotated else ()
        for meta in metadata:
            if isinstance(meta, msgspec.Meta) and meta.extra and "accepted" in meta.extra:
                marked[field.name] = (meta.extra["accepted"], meta.extra["how"])
    return marked
