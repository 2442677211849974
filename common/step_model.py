"""The step-time model instances profile at start-up (`common.profiling`) and report in their
heartbeats; the scheduler's offloading policy reads it. Kept free of torch so that the
scheduler does not load it."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class StepModel:
    fixed_s: float
    per_seq_s: float
    per_token_s: float

    def time(self, batch: int, tokens: int) -> float:
        """Predicted seconds of one step over `batch` requests holding `tokens` context tokens in all."""
        return self.fixed_s + self.per_seq_s * batch + self.per_token_s * tokens

    @property
    def profiled(self) -> bool:
        """Whether the fit is usable: a positive, finite per-token cost.

        Reading more KV always costs time, so a slope at or below zero only says the profile
        could not tell the per-token from the per-sequence cost (noise, too little spread).
        Such a model would make the instance's attention bandwidth (1 / `per_token_s`)
        infinite and every bound built on it meaningless: it counts as no model at all.
        """
        values = (self.fixed_s, self.per_seq_s, self.per_token_s)
        return all(math.isfinite(v) for v in values) and self.per_token_s > 0

    def to_wire(self) -> list[float]:
        return [self.fixed_s, self.per_seq_s, self.per_token_s]

    @classmethod
    def from_wire(cls, values: list[float]) -> StepModel | None:
        """The model a heartbeat carries; None when the instance sent none or an unusable one
        (not `profiled`): the policy then treats the instance as not profiled."""
        if len(values) != 3:
            return None
        model = cls(*values)
        return model if model.profiled else None

    @classmethod
    def fit(cls, samples: list[tuple[int, int, float]]) -> StepModel:
        """Least squares over (batch, tokens, seconds); coefficients clamped at zero (noise can
        make a small one negative, and a negative cost would let the policy promise anything).
        A per-token cost clamped to zero leaves a model that is not `profiled`."""
        x = np.array([[1.0, b, t] for b, t, _ in samples])
        y = np.array([s for _, _, s in samples])
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        fixed, per_seq, per_token = (max(0.0, float(c)) for c in coef)
        return cls(fixed, per_seq, per_token)


@dataclass
class Slowdown:
    """How much slower real steps run than the start-up profile predicts, over the recent ones.

    An attention executor shares its device with a prefill instance: the bandwidth it can give
    decode attention is what the prefill leaves, which an idle start-up profile overstates.
    Rather than refit a model from whatever shapes traffic happens to bring (little spread, so a
    noisy slope: the failure that made the policy refuse everything), the profile keeps its
    shape and is scaled by measured time over predicted time. A factor within [1/`limit`,
    `limit`]; 1 until `min_steps` steps were seen within `ttl_s`, so an old load is forgotten.
    """

    window: int = 64
    min_steps: int = 8
    ttl_s: float = 10.0
    limit: float = 50.0
    _steps: deque[tuple[float, float, float]] = field(default_factory=deque)  # (when, measured, predicted)

    def observe(self, measured_s: float, predicted_s: float, now: float) -> None:
        if measured_s >= 0 and predicted_s > 0 and math.isfinite(measured_s):
            self._steps.append((now, measured_s, predicted_s))
            while len(self._steps) > self.window:
                self._steps.popleft()

    def factor(self, now: float) -> float:
        while self._steps and now - self._steps[0][0] > self.ttl_s:
            self._steps.popleft()
        if len(self._steps) < self.min_steps:
            return 1.0
        measured = sum(m for _, m, _ in self._steps)
        predicted = sum(p for _, _, p in self._steps)
        return min(self.limit, max(1 / self.limit, measured / predicted))

    def scaled(self, model: StepModel, now: float) -> StepModel:
        f = self.factor(now)
        return StepModel(model.fixed_s * f, model.per_seq_s * f, model.per_token_s * f)
