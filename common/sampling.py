"""Per-request sampling for a whole batch in one pass.

Seeded requests draw their randomness from `(seed, step)` alone, never from a generator
that lives in one process: the prefill instance samples a request's first token and a decode
instance the rest, and a seeded request must give the same text whichever instances serve it
and whatever it is batched with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from common.logits_processors import History, process_logits
from common.messages import Sampling
from common.sampling_checks import check_sampling


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16  # tokens to generate at most, the first (from prefill) included
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # tokens kept; 0 or -1 keeps all
    seed: int | None = None  # makes a sampled request reproducible
    stop_token_ids: tuple[int, ...] = ()  # end the request when one is generated (it is kept)
    ignore_eos: bool = False  # do not stop at the model's end-of-sequence tokens
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: and the n most likely
    # Logits processors (common/logits_processors.py), in the order they apply:
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    min_tokens: int = 0  # stop and end-of-sequence tokens are masked until this many tokens exist
    repetition_penalty: float = 1.0  # over prompt and output tokens, as transformers'; 1 is none
    frequency_penalty: float = 0.0  # times each token's count in the output, as OpenAI's
    presence_penalty: float = 0.0  # once for each token present in the output, as OpenAI's
    bad_words: tuple[tuple[int, ...], ...] = ()  # token sequences never completed in the output (vLLM's)
    min_p: float = 0.0  # after temperature, drop tokens less likely than min_p times the likeliest (vLLM's)
    prompt_logprobs: int | None = None  # None: none; n: each prompt token's logprob and the n most likely
    eos_token_ids: tuple[int, ...] = field(default=(), repr=False)  # filled in by the engine

    def __post_init__(self) -> None:
        check_sampling(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor applies: without one, sampling reads the model's logits as they are."""
        return bool(self.logit_bias or self.min_tokens or self.bad_words or self.penalized)

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def stops_at(self, token_id: int) -> bool:
        return token_id in self.stop_token_ids or (not self.ignore_eos and token_id in self.eos_token_ids)


def to_wire(params: SamplingParams) -> Sampling:
    """The message form of validated parameters (what the gateway sends); `from_wire` reverses it."""
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(Sampling)}
    lists = {
        "stop_token_ids": list(params.stop_token_ids),
        "logit_bias": list(params.logit_bias),
        "bad_words": [list(word) for word in params.bad_words],
    }
    return Sampling(**{**values, **lists})


def from_wire(sampling: Sampling) -> SamplingParams:
    """Parameters from a message, validated (raises InvalidRequestError naming the field)."""
    values = {f.name: getattr(sampling, f.name) for f in dataclasses.fields(Sampling)}
    tuples = {
        "stop_token_ids": tuple(sampling.stop_token_ids),
        "logit_bias": tuple((t, float(b)) for t, b in sampling.logit_bias),
        "bad_words": tuple(tuple(word) for word in sampling.bad_words),
    }
    return SamplingParams(**{**values, **tuples})


def processes_logits(params: list[SamplingParams]) -> bool:
    """Whether any row of a batch has a logits processor (and so needs its token history)."""
    return any(p.processes_logits for p in params)


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]  # one per row
    logprobs: list[float] | None  # the chosen token's log-probability, per row; None if no row asked
    top_logprobs: list[list[tuple[int, float]]] | None  # the n most likely per row (empty where not asked)


def _step_generator(seed: int, step: int) -> torch.Generator:
    # splitmix-style mixing keeps (seed, step) pairs from colliding for nearby values.
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (2**63)
    return torch.Generator().manual_seed(mixed)


def sample(
    logits: torch.Tensor,  # [B, vocab], float32
    params: list[SamplingParams],
    steps: list[int],  # per row: how many tokens the request has generated so far
    generator: torch.Generator | None = None,  # randomness for unseeded rows
    histories: Sequence[History] | None = None,  # per row; needed only by rows that process logits
) -> SampleResult:
    """Choose one token per row. Greedy rows take the argmax of the (processed) logits.

    Logprobs are those of the model's own distribution, before any processor or temperature
    (vLLM's default, `raw_logprobs`): they say what the model thought, not what was drawn from.
    """
    batch, vocab = logits.shape
    raw = logits = logits.float()
    if processes_logits(params):  # the common case pays for this test only
        if histories is None:
            raise ValueError("logits processors need each row's token history")
        logits = process_logits(logits, params, histories)
    chosen = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows)
        scaled = logits[rows] / torch.tensor([params[i].temperature for i in sampled_rows])[:, None]
        scaled = _top_k_top_p(scaled, [params[i].top_k for i in sampled_rows], [params[i].top_p for i in sampled_rows])
        scaled = _min_p(scaled, [params[i].min_p for i in sampled_rows])
        probs = torch.softmax(scaled, dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p, and lets each row
        # take its noise from its own generator without a per-row multinomial call.
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled_rows):
            seed = params[i].seed
            gen = _step_generator(seed, steps[i]) if seed is not None else generator
            noise[j].exponential_(generator=gen)
        chosen[rows] = (probs / noise).argmax(dim=-1)
    token_ids = chosen.tolist()
    if all(p.logprobs is None for p in params):
        return SampleResult(token_ids, None, None)
    logp = torch.log_softmax(raw, dim=-1)
    chosen_logp = logp.gather(1, chosen[:, None]).squeeze(1).tolist()
    top_n = max(p.logprobs or 0 for p in params)
    top: list[list[tuple[int, float]]] = [[] for _ in range(batch)]
    if top_n:
        values, indices = logp.topk(min(top_n, vocab), dim=-1)
        for i, p in enumerate(params):
            n = p.logprobs or 0
            top[i] = list(zip(indices[i, :n].tolist(), values[i, :n].tolist(), strict=True))
    return SampleResult(token_ids, chosen_logp, top)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus; vectorized over rows."""
    vocab = logits.shape[-1]
    if all(k <= 0 or k >= vocab for k in top_k) and all(p >= 1.0 for p in top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_k])[:, None]
    drop = ranks >= k
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked above each one
    drop |= mass_before >= torch.tensor(top_p)[:, None]
    drop[:, 0] = False  # the most likely token always survives
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


def _min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Mask tokens less likely than each row's `min_p` times its likeliest token (vLLM's `min_p`).

    Applied after temperature, top-k and top-p, in transformers' order (`MinPLogitsWarper`);
    vLLM applies it before top-p, which differs only when a request sets both. The likeliest token
    always survives (its ratio is 1), and masking by top-k or top-p first changes no ratio.
    """
    if all(p <= 0.0 for p in min_p):
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = torch.tensor(min_p, dtype=probs.dtype)[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))
