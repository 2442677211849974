"""Output tokens to text, incrementally, with stop strings.

Text is decoded incrementally, as vLLM and TGI do: decoding token by token would split
multi-byte characters and break tokenizers whose pieces depend on their neighbours
(SentencePiece's leading spaces), and decoding the whole output at every step costs O(n^2) over
a long generation. So each step decodes a short window that starts a few tokens back, at the
last settled boundary (`_prefix`), and keeps what the window adds beyond the text of its settled
part (`_prefix:_read`). Two kinds of text are held back until the next step decides them:

- a trailing U+FFFD: the last token ended inside a UTF-8 character that the next completes;
- a trailing piece that could be the start of a stop string: if the stop string completes, the
  client must never have seen its first half.

A stop string found in the text ends the request: the text is cut just before it (after it with
`include_stop_str_in_output`) and the finish reason is "stop" (the caller aborts the backend,
which does not know about stop strings). Stop strings are looked for only once the output has
`min_tokens` tokens, as vLLM does. A request the backend ended on a stop or end-of-sequence token
leaves that token's text out, unless `include_stop_str_in_output` (vLLM's rule too; with
`skip_special_tokens`, the default, a special token has no text anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.messages import TokenEvent
from services.gateway import openai_types as oa

REPLACEMENT = "\ufffd"


Tokenizer = Any  # a transformers tokenizer; only `decode(token_ids, skip_special_tokens=...)` is used


@dataclass
class Piece:
    """What one step adds to the visible output, with the logprobs of the tokens it covers."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


class TextStream:
    """Feed it token events in order; it returns what the client may see now, and how the output ended."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: list[str],
        *,
        include_stop: bool = False,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.include_stop = include_stop
        self.skip_special_tokens = skip_special_tokens
        self.min_tokens = min_tokens
        self.token_ids: list[int] = []  # every generated token, including any past a stop string
        self.text = ""  # the text emitted so far
        self.finish_reason: str | None = None
        self.stopped_by_string = False
        self._pending = Piece()  # tokens whose text is held back, with their logprobs
        self._settled = ""  # decoded text of token_ids[:_read], final
        self._prefix = 0  # the decode window starts here: the token before the settled boundary
        self._read = 0  # token_ids[:_read] are settled

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, event: TokenEvent) -> Piece:
        if self.finished:
            return Piece()
        self.token_ids += event.token_ids
        self._pending.token_ids += event.token_ids
        self._pending.logprobs += event.logprobs
        self._pending.top_logprobs += event.top_logprobs
        full = self._decode()
        final = event.finish_reason is not None
        if event.finish_reason == "stop" and not self.include_stop:  # once, at the end: decode it whole
            full = self.tokenizer.decode(self.token_ids[:-1], skip_special_tokens=self.skip_special_tokens)
        cut = self._find_stop(full) if len(self.token_ids) >= self.min_tokens else None
        if cut is not None:
            full, final = full[:cut], True
            self.finish_reason, self.stopped_by_string = "stop", True
        elif final:
            self.finish_reason = event.finish_reason
        end = len(full) if final else self._visible_end(full)
        if end <= len(self.text) and not final:
            return Piece()
        piece, self._pending = self._pending, Piece()
        piece.text = full[len(self.text) : end]
        self.text += piece.text
        return piece

    def _decode(self) -> str:
        """The whole output's text so far, decoding only the window since the last settled boundary.
        The window's new text settles once it does not end inside a UTF-8 character."""
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        before = decode(self.token_ids[self._prefix : self._read], skip_special_tokens=skip)
        window = decode(self.token_ids[self._prefix :], skip_special_tokens=skip)
        if window.startswith(before):
            tail = window[len(before) :]
        else:  # a tokenizer that rewrites text across the boundary: decode it all, once
            tail = decode(self.token_ids, skip_special_tokens=skip)[len(self._settled) :]
        if tail.endswith(REPLACEMENT):
            return self._settled + tail
        self._settled += tail
        self._prefix, self._read = self._read, len(self.token_ids)
        return self._settled

    def _find_stop(self, full: str) -> int | None:
        """Where the text ends at the earliest stop string (before it, or after it with `include_stop`),
        searching only text that can hold a new match."""
        if not self.stop:
            return None
        start = max(0, len(self.text) - self.max_stop + 1)
        found = [(i, len(s)) for i, s in ((full.find(s, start), s) for s in self.stop) if i >= 0]
        if not found:
            return None
        at, length = min(found)
        return at + length if self.include_stop else at

    def _visible_end(self, full: str) -> int:
        end = len(full.rstrip(REPLACEMENT))
        for n in range(min(self.max_stop - 1, end), 0, -1):
            tail = full[end - n : end]
            if any(s.startswith(tail) for s in self.stop):
                return end - n
        return end


def token_strings(tokenizer: Tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's own text, as OpenAI's logprobs name tokens."""
    return [tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]


def completion_logprobs(tokenizer: Tokenizer, piece: Piece, offset: int, top_n: int | None = None) -> dict[str, Any]:
    """The legacy completions `logprobs` object; `offset` is where this piece's text starts in the
    output (with `echo`, after the prompt's text); `top_n`, if given, the alternatives shown at most."""
    tokens = token_strings(tokenizer, piece.token_ids)
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    top = [
        {tokenizer.decode([tid], skip_special_tokens=False): lp for tid, lp in row[:top_n]} if row[:top_n] else None
        for row in piece.top_logprobs
    ]
    return {"tokens": tokens, "token_logprobs": piece.logprobs, "top_logprobs": top, "text_offset": offsets}


def echo_logprobs(tokenizer: Tokenizer, prompt: Piece, top: int) -> dict[str, Any]:
    """The echoed prompt's part of the legacy completions `logprobs` object: `prompt` holds every
    prompt token and the logprobs of all but the first (which has no context: null, as OpenAI), with
    up to `top` alternatives each. Offsets count from the start of the echoed text."""
    lead = Piece(token_ids=prompt.token_ids, logprobs=prompt.logprobs, top_logprobs=[[], *prompt.top_logprobs])
    shaped = completion_logprobs(tokenizer, lead, 0, top)
    shaped["token_logprobs"] = [None, *prompt.logprobs]
    shaped["top_logprobs"][0] = None
    return shaped


def vllm_prompt_logprobs(tokenizer: Tokenizer, prompt: Piece) -> list[dict[str, oa.PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` of a choice: null for the first prompt token, then per token its own
    entry and its alternatives', by token id (the alternatives ranked 1, 2...: the own token's rank
    is known only when it is one of them)."""
    text: dict[int, str] = {}

    def entry(token: int, logprob: float, rank: int | None) -> oa.PromptLogprob:
        if token not in text:
            text[token] = tokenizer.decode([token], skip_special_tokens=False)
        return oa.PromptLogprob(logprob, rank, text[token])

    shaped: list[dict[str, oa.PromptLogprob] | None] = [None]
    for token, logprob, row in zip(prompt.token_ids[1:], prompt.logprobs, prompt.top_logprobs, strict=True):
        ranks = {t: i + 1 for i, (t, _) in enumerate(row)}
        position = {str(token): entry(token, logprob, ranks.get(token))}
        for t, value in row:
            position.setdefault(str(t), entry(t, value, ranks[t]))
        shaped.append(position)
    return shaped


def chat_logprobs(tokenizer: Tokenizer, piece: Piece) -> dict[str, Any]:
    """The chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}]}`."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for i, (token_id, logprob) in enumerate(zip(piece.token_ids, piece.logprobs, strict=False)):
        row = piece.top_logprobs[i] if i < len(piece.top_logprobs) else []
        content.append({**entry(token_id, logprob), "top_logprobs": [entry(t, lp) for t, lp in row]})
    return {"content": content}
