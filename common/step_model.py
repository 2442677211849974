"""The step-time model instances profile at start-up (`common.profiling`) and report in their
heartbeats; the scheduler's offloading policy reads it. Kept free of torch so that the
scheduler does not load it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepModel:
    fixed_s: float
    per_seq_s: float
    per_token_s: float

    def time(self, batch: int, tokens: int) -> float:
        """Predicted seconds of one step over `batch` requests holding `tokens` context tokens in all."""
        return self.fixed_s + self.per_seq_s * batch + self.per_token_s * tokens

    def to_wire(self) -> list[float]:
        return [self.fixed_s, self.per_seq_s, self.per_token_s]

    @classmethod
    def from_wire(cls, values: list[float]) -> StepModel | None:
        """The model a heartbeat carries; None when the instance sent none (not profiled)."""
        return cls(*values) if len(values) == 3 else None

    @classmethod
    def fit(cls, samples: list[tuple[int, int, float]]) -> StepModel:
        """Least squares over (batch, tokens, seconds); coefficients clamped at zero (noise can
        make a small one negative, and a negative cost would let the policy promise anything)."""
        x = np.array([[1.0, b, t] for b, t, _ in samples])
        y = np.array([s for _, _, s in samples])
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        fixed, per_seq, per_token = (max(0.0, float(c)) for c in coef)
        return cls(fixed, per_seq, per_token)
