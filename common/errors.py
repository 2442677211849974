"""Exceptions every layer shares, so that a service can map each to one HTTP status.

The gateway turns `InvalidRequestError` into a 400 naming `field`, `CapacityError` into a 429,
and `ModelLoadError` stops a service at start-up with the reason; nothing else should need
to parse an error message.
"""

from __future__ import annotations


class AdrenalineError(Exception):
    """Base of every error this project raises on purpose."""


class InvalidRequestError(AdrenalineError, ValueError):
    """A request the caller can fix: `field` names the offending parameter."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ModelLoadError(AdrenalineError):
    """A checkpoint folder that cannot be served: missing file, unsupported architecture, bad shape."""


class NoFreeBlocksError(AdrenalineError):
    """The KV cache cannot hold what was asked; nothing was allocated, the caller decides what to do."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"need {needed} KV blocks, {free} free")
        self.needed = needed
        self.free = free
