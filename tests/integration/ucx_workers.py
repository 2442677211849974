"""A real UCX worker made to misbehave as a dead peer's transport can make it (named so: a
stand-in around a real worker, for the progress loops' tests)."""

from __future__ import annotations


class NeverArms:
    """A real worker whose events never run out: every progress call reports work done and
    `arm()` always finds events pending."""

    def __init__(self, worker: object) -> None:
        self.worker = worker

    def __getattr__(self, name: str) -> object:
        return getattr(self.worker, name)

    def progress_once(self) -> bool:
        self.worker.progress_once()  # type: ignore[attr-defined]
        return True

    def arm(self) -> bool:
        return False
