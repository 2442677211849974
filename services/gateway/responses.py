"""OpenAI's response shapes for one request's choices: whole bodies, stream chunks, usage.

Choice `index` is OpenAI's numbering (prompt i's sample j is i * n + j); every chunk of a stream
names the choice it belongs to, and chunks of different choices interleave as they are ready.

A completions choice whose prompt's logprobs were asked for (vLLM's `prompt_logprobs`, or `echo`
with `logprobs`) has them from the prefill instance with its first token: its body (or its first
chunk, which then also carries the echoed text rather than a chunk of its own) shows them as
vLLM's `prompt_logprobs` and, echoed, at the head of OpenAI's `logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from common.messages import Sampling
from services.gateway import openai_types as oa
from services.gateway.text import (
    Piece,
    Tokenizer,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    vllm_prompt_logprobs,
)


@dataclass(frozen=True)
class Choice:
    """One output sequence of a request, served as one request of the cluster."""

    index: int  # prompt * n + sample
    prompt_index: int
    sample: int
    prompt: list[int]
    sampling: Sampling  # a seeded request's sample j is seeded with seed + j, as vLLM does
    echo: str = ""  # completions' `echo`: the prompt's text, sent before the output's


@dataclass(frozen=True)
class Outcome:
    """A choice's whole output, for a JSON body."""

    choice: Choice
    piece: Piece = field(default_factory=Piece)  # all of its text, tokens and logprobs
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt: Piece | None = None  # the prompt's tokens and logprobs, when asked for (`Run.prompt`)


def fan_out(prompt_index: int, n: int, prompt: list[int], sampling: Sampling, echo: str = "") -> list[Choice]:
    """A prompt's `n` choices, numbered as OpenAI does; sample j of a seeded request is seeded with
    seed + j (vLLM's rule), so that samples differ and each stays reproducible."""
    choices = []
    for j in range(n):
        seeded = sampling if sampling.seed is None or j == 0 else replace(sampling, seed=(sampling.seed + j) % 2**63)
        choices.append(Choice(prompt_index * n + j, prompt_index, j, prompt, seeded, echo))
    return choices


def usage(choices: list[Choice], completion_tokens: int) -> oa.Usage:
    """Each prompt counted once, however many samples it has (OpenAI's and vLLM's usage); every
    choice's output tokens summed."""
    prompt_tokens = sum(len(c.prompt) for c in choices if c.sample == 0)
    return oa.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


class Shapes:
    """Builds the response objects of one request (chat or completions)."""

    def __init__(self, tokenizer: Tokenizer, chat: bool, request_id: str, created: int, model: str) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.head = (request_id, created, model)

    def body(self, outcomes: list[Outcome], logprobs: bool) -> oa.CompletionResponse | oa.ChatCompletionResponse:
        outcomes = sorted(outcomes, key=lambda o: o.choice.index)
        total = usage([o.choice for o in outcomes], sum(o.completion_tokens for o in outcomes))
        if self.chat:
            chat_choices = [
                oa.ChatChoice(
                    o.choice.index,
                    oa.ChatMessageOut(o.piece.text),
                    chat_logprobs(self.tokenizer, o.piece) if logprobs else None,
                    o.finish_reason,
                )
                for o in outcomes
            ]
            return oa.ChatCompletionResponse(*self.head, chat_choices, total)
        text_choices = [
            self._completion_choice(o.choice, o.piece, 0, o.finish_reason, logprobs, o.prompt, o.choice.echo)
            for o in outcomes
        ]
        return oa.CompletionResponse(*self.head, text_choices, total)

    def chunk(
        self,
        choice: Choice,
        piece: Piece,
        offset: int,
        finish_reason: str | None,
        logprobs: bool,
        prompt: Piece | None = None,
    ) -> Any:
        """One stream chunk: `piece` of `choice`, whose text starts at `offset` in its output; `prompt`
        with a choice's first piece, if its prompt's logprobs were asked for."""
        if self.chat:
            chat_lp = chat_logprobs(self.tokenizer, piece) if logprobs and piece.token_ids else None
            delta = oa.Delta(content=piece.text or None)
            chat_choice = oa.ChatChunkChoice(choice.index, delta, chat_lp, finish_reason)
            return oa.ChatCompletionChunk(*self.head, [chat_choice], None)
        with_logprobs = logprobs and bool(piece.token_ids or prompt)
        echo = choice.echo if prompt is not None else ""  # else it was a chunk of its own (`opening`)
        shaped = self._completion_choice(choice, piece, offset, finish_reason, with_logprobs, prompt, echo)
        return oa.CompletionResponse(*self.head, [shaped])

    def _completion_choice(
        self,
        choice: Choice,
        piece: Piece,
        offset: int,
        finish_reason: str | None,
        logprobs: bool,
        prompt: Piece | None,
        echo: str,
    ) -> oa.CompletionChoice:
        """A completions choice, or one chunk of it: `echo` (the prompt's text, or nothing) before the
        output's `piece`, whose text starts at `offset` in the output; with `prompt`, the prompt's
        logprobs, which also lead OpenAI's `logprobs` when the prompt is echoed here."""
        shaped: dict[str, Any] | None = None
        if logprobs:
            shaped = completion_logprobs(self.tokenizer, piece, len(choice.echo) + offset)
            if echo and prompt is not None:
                lead = echo_logprobs(self.tokenizer, prompt, choice.sampling.logprobs or 0)
                shaped = {key: lead[key] + shaped[key] for key in lead}
        vllm = vllm_prompt_logprobs(self.tokenizer, prompt) if prompt is not None else None
        return oa.CompletionChoice(choice.index, echo + piece.text, shaped, finish_reason, vllm)

    @staticmethod
    def _echo_opens(choice: Choice) -> bool:
        """Whether a streamed choice's echoed prompt is a chunk of its own, sent at once: unless its
        prompt's logprobs must come with it (they come with the first token)."""
        return bool(choice.echo) and choice.sampling.prompt_logprobs is None

    def opening(self, choice: Choice) -> Any | None:
        """What a choice's stream starts with: chat's role, or the echoed prompt; None if nothing."""
        if self.chat:
            opening = oa.ChatChunkChoice(choice.index, oa.Delta(role="assistant", content=""), None, None)
            return oa.ChatCompletionChunk(*self.head, [opening], None)
        if self._echo_opens(choice):
            return oa.CompletionResponse(*self.head, [oa.CompletionChoice(choice.index, choice.echo, None, None)])
        return None

    def usage_chunk(self, total: oa.Usage) -> Any:
        if self.chat:
            return oa.ChatCompletionChunk(*self.head, [], total)
        return oa.CompletionResponse(*self.head, [], total)
