"""`python -m services.gateway --nats-url URL --model DIR --port P`: serve the OpenAI API with uvicorn."""

from __future__ import annotations

import sys

import structlog
import uvicorn

from common.errors import AdrenalineError
from common.logging import configure
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings


def main(argv: list[str] | None = None) -> None:
    settings = GatewaySettings.parse(argv)
    log = configure("gateway", settings.log_level)
    # Bound in the context every request task inherits, so each line names its gateway.
    structlog.contextvars.bind_contextvars(service="gateway", gateway_id=settings.gateway_id)
    log.info("starting", gateway_id=settings.gateway_id, model=settings.served_model_name, port=settings.port)
    try:
        app = create_app(settings)
    except AdrenalineError as exc:  # a model folder we cannot serve: say why, no traceback
        log.error("cannot start", model=settings.model, error=str(exc))
        sys.exit(2)
    # uvicorn handles SIGINT/SIGTERM itself: it stops accepting, lets requests finish, then runs
    # the app's shutdown hook, which aborts what is still in flight and drains NATS.
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main(sys.argv[1:])
