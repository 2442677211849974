"""structlog set-up: JSON lines in services (one object per line, for collectors), pretty on a terminal.

Bind the request id with `structlog.contextvars.bind_contextvars(request_id=...)` or pass it
to each call, so that every line about a request carries it in every service.
"""

from __future__ import annotations

import logging
import sys

import structlog


def configure(service: str, level: str = "INFO", json: bool | None = None) -> structlog.stdlib.BoundLogger:
    """Configure the process's logging once and return a logger bound to `service`."""
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logger: structlog.stdlib.BoundLogger = structlog.get_logger().bind(service=service)
    return logger
