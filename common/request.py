"""A request's state inside one engine: its tokens, its sampling parameters and how it ended."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # no KV cached (new, or preempted and to be recomputed)
    RUNNING = "running"  # KV cached for all tokens but the last
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # a stop or end-of-sequence token
    LENGTH = "length"  # max_new_tokens, or the model's context
    ABORT = "abort"  # the caller gave up
    ERROR = "error"  # the system failed it (e.g. its attention executor died)


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's tokens' log-probabilities, from its second token on (the first has no context):
    `logprobs[j]` is that of prompt token j + 1 given those before it, `top[j]` the most likely
    tokens there with theirs (empty lists when none were asked for). The model's own distribution,
    as generated tokens' logprobs are."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    executor: str | None = None  # where its KV and decode attention live; None: this engine's pool
    prompt_logprobs: PromptLogprobs | None = None  # computed by its first prefill, if its params ask

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
