"""`python -m services.gateway --nats-url URL --model DIR --port P`: serve the OpenAI API with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from types import FrameType

import structlog
import uvicorn

from common.errors import AdrenalineError
from common.lifetime import exit_after, exit_now
from common.logging import configure
from common.watchdog import watch_loop
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
    # uvicorn handles SIGINT/SIGTERM itself: it stops accepting, lets requests finish (for at most
    # SHUTDOWN_REQUESTS_S), then runs the app's shutdown hook, which aborts what is still in flight
    # and drains NATS (bounded too).
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_REQUESTS_S,
    )
    server = BoundedServer(config)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the SIGINT it handled once it is done
        server.run()
    if not server.started:  # as uvicorn.run: a gateway that never served (port taken, no NATS) fails
        sys.exit(3)


SHUTDOWN_REQUESTS_S = 2  # how long requests in flight may go on once the gateway is told to stop
SHUTDOWN_GRACE_S = 4.0  # after the first signal, the process exits by then whatever it waits on


class BoundedServer(uvicorn.Server):
    """uvicorn's server, whose shutdown cannot hang: the services' rule (`services.runtime.run_until_signalled`).

    uvicorn forces its exit only on a second SIGINT, and even its graceful path may wait on NATS
    (the shutdown hook): so any second signal exits at once, and the first arms a deadline.
    """

    signalled = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's serve, under the services' loop watch: a stalled event loop dumps every
        thread's stack into the gateway's log (`common.watchdog`)."""
        watchdog = asyncio.create_task(watch_loop())
        try:
            await super().serve(sockets)
        finally:
            watchdog.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signalled:
            exit_now(128 + sig)
        self.signalled = True
        super().handle_exit(sig, frame)
        exit_after(SHUTDOWN_GRACE_S, 128 + sig)


if __name__ == "__main__":
    main(sys.argv[1:])
