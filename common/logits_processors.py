"""Logits processors: logit bias, min_tokens, bad words, and the repetition, frequency and presence penalties.

They change a row's logits from its own token history before any temperature, top-k or top-p,
in vLLM's order (bias, min_tokens, bad words, then the penalties; the order of those that set -inf
does not matter) and with its semantics, which are also transformers' and OpenAI's:

- `logit_bias`: the bias is added to the token's logit (OpenAI; transformers'
  `SequenceBiasLogitsProcessor` with one-token sequences).
- `min_tokens`: while fewer output tokens than that exist, the request's stop tokens and (unless
  `ignore_eos`) its end-of-sequence tokens get -inf (transformers' `MinNewTokensLengthLogitsProcessor`).
- `bad_words`: token sequences the output must never complete: where the output ends with all of
  a sequence but its last token, that token gets -inf (a one-token sequence is always banned);
  transformers' `NoBadWordsLogitsProcessor`, except that only the output is matched, as vLLM does
  (a word the prompt started may be completed). The gateway makes the sequences from vLLM's
  `bad_words` strings (`services/gateway/prompts.py`).
- `repetition_penalty` r: every token of the prompt or the output has its logit divided by r if
  positive, multiplied by r if not (transformers' `RepetitionPenaltyLogitsProcessor`, whose
  history is prompt and output).
- `frequency_penalty` f and `presence_penalty` p, over output tokens only (OpenAI's definition):
  logit -= f * count(token) + p * (count(token) > 0).

A row's history is its prompt and output token ids, which every instance that samples for the
request holds (the prefill instance samples the first token from the prompt, a decode instance
the rest with the first token already in the output), so the processed logits, and with them
seeded draws, are the same whichever instance serves a step. Only rows with a processor are
touched; a batch without any never reaches this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from common.sampling import SamplingParams

History = tuple[Sequence[int], Sequence[int]]  # (prompt token ids, output token ids)


def process_logits(logits: torch.Tensor, params: list[SamplingParams], histories: Sequence[History]) -> torch.Tensor:
    """`logits` [B, vocab] with every row's processors applied (a new tensor; rows without any unchanged)."""
    rows = [i for i, p in enumerate(params) if p.processes_logits]
    if not rows:
        return logits
    index = torch.tensor(rows)
    sub = logits[index]  # a copy: the caller's logits stay the model's own
    for j, i in enumerate(rows):
        p, (_, output) = params[i], histories[i]
        if p.logit_bias:
            ids, biases = zip(*p.logit_bias, strict=True)
            sub[j, list(ids)] += torch.tensor(biases, dtype=sub.dtype)
        if len(output) < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(p.eos_token_ids))
            if stops:
                sub[j, sorted(stops)] = float("-inf")
        if p.bad_words:
            banned = _completing(p.bad_words, output)
            if banned:
                sub[j, banned] = float("-inf")
    penalized = [j for j, i in enumerate(rows) if params[i].penalized]
    if penalized:
        sub[penalized] = _penalize(
            sub[penalized], [params[rows[j]] for j in penalized], [histories[rows[j]] for j in penalized]
        )
    out = logits.clone()
    out[index] = sub
    return out


def _completing(words: Sequence[Sequence[int]], output: Sequence[int]) -> list[int]:
    """The last token of each word whose other tokens end the output (all one-token words)."""
    banned = []
    for word in words:
        prefix = len(word) - 1
        if prefix > len(output):
            continue
        if prefix == 0 or list(output[len(output) - prefix :]) == list(word[:prefix]):
            banned.append(word[-1])
    return banned


def _penalize(logits: torch.Tensor, params: list[SamplingParams], histories: list[History]) -> torch.Tensor:
    """The three penalties over a [R, vocab] block, vectorized: one scatter builds the output counts."""
    rows, vocab = logits.shape
    counts = torch.zeros(rows, vocab, dtype=logits.dtype)
    outputs = _flat([output for _, output in histories], vocab)
    if outputs is not None:
        counts.view(-1).index_add_(0, outputs, torch.ones(len(outputs), dtype=logits.dtype))
    repetition = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype)[:, None]
    if bool((repetition != 1.0).any()):
        seen = counts > 0
        prompts = _flat([prompt for prompt, _ in histories], vocab)
        if prompts is not None:
            seen.view(-1)[prompts] = True
        factor = torch.where(seen, repetition, torch.ones_like(logits))
        logits = torch.where(logits > 0, logits / factor, logits * factor)
    frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype)[:, None]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def _flat(rows: list[Sequence[int]], vocab: int) -> torch.Tensor | None:
    """Row j's token ids as indices into a flattened [rows, vocab] tensor (built in C, not per token)."""
    parts = [torch.tensor(ids, dtype=torch.long) + j * vocab for j, ids in enumerate(rows) if len(ids)]
    return torch.cat(parts) if parts else None
