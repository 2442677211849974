"""The control plane: a NATS connection that sends and receives only our typed messages.

Request/reply carries a timeout, so "nobody is serving that subject" is an immediate
`ServiceUnavailable` (NATS answers "no responders" at once) and a hung peer is one after the
timeout, never a hang. A malformed message is logged, counted and dropped: one bad peer must
not take a subscriber down.

A connection that loses its server reconnects for as long as the process runs (a NATS restart
must not take the cluster down), logging one line per outage rather than a traceback per
attempt. `close()` is bounded either way: a service told to stop while NATS is gone must still
exit promptly.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from common import nats_transport
from common.errors import AdrenalineError
from common.messages import MessageError, decode, encode
from common.nats_auth import inbox_prefix

log = structlog.get_logger(__name__)
M = TypeVar("M")
PING_INTERVAL_S = 5  # with MAX_OUTSTANDING_PINGS: a silent connection is replaced within 15-20 s
MAX_OUTSTANDING_PINGS = 3
Reply = Callable[[Any], Awaitable[None]]


class ServiceUnavailable(AdrenalineError):
    """Nobody answered on a subject in time: no instance is up, or it is stuck."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject


@dataclass(frozen=True)
class NatsAuth:
    """How a service proves who it is to NATS, and checks who NATS is (docs/security.md).

    A user and password per role: the server's permissions for that user decide which subjects
    the role may publish and subscribe. With a CA, the connection is TLS and the server's
    certificate is verified; with a certificate and key too, NATS can verify the client.
    """

    user: str = ""
    password: str = field(default="", repr=False)
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def options(self) -> dict[str, Any]:
        """nats.connect's keyword arguments for these credentials."""
        options: dict[str, Any] = {}
        if self.user:
            # Replies come back under an inbox only this user may subscribe to (common/nats_auth.py).
            options.update(user=self.user, password=self.password, inbox_prefix=inbox_prefix(self.user))
        if self.tls_ca:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key or None)
            options["tls"] = context
        return options


class Bus:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.malformed = 0  # messages dropped because they did not decode

    @classmethod
    async def connect(cls, url: str, name: str, auth: NatsAuth | None = None) -> Bus:
        """Connect to `url` (several comma-separated URLs name the nodes of a NATS cluster)."""
        last_error = ""

        async def on_error(exc: Exception) -> None:
            # nats-py's default logs a traceback per failed reconnect attempt (one every 2 s, forever).
            nonlocal last_error
            text = f"{type(exc).__name__}: {exc}"
            if text != last_error:
                last_error = text
                log.warning("nats connection error", connection=name, error=text)

        async def on_reconnected() -> None:
            nonlocal last_error
            last_error = ""
            log.info("nats reconnected", connection=name)

        nats_transport.install()
        client = await nats.connect(
            [u.strip() for u in url.split(",") if u.strip()],
            name=name,
            connect_timeout=5,
            max_reconnect_attempts=-1,
            drain_timeout=2,
            # A connection whose pings go unanswered this long is stale: reconnect (default: minutes).
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            error_cb=on_error,
            reconnected_cb=on_reconnected,
            **(auth or NatsAuth()).options(),
        )
        return cls(client)

    async def publish(self, subject: str, message: Any) -> None:
        await self.client.publish(subject, encode(message))

    async def request(self, subject: str, message: Any, reply_type: type[M], timeout: float) -> M:
        try:
            msg = await self.client.request(subject, encode(message), timeout=timeout)
        except NoRespondersError:
            raise ServiceUnavailable(subject, "no instance is listening") from None
        except NatsTimeout:
            raise ServiceUnavailable(subject, f"no reply within {timeout} s") from None
        return decode(msg.data, reply_type)

    async def subscribe(
        self,
        subject: str,
        message_type: type[M],
        handler: Callable[[M, Reply | None], Awaitable[None]],
        queue: str = "",
    ) -> Subscription:
        """Call `handler(message, reply)` for each message; `reply` is None when none was asked for."""

        async def on_message(msg: Msg) -> None:
            try:
                message = decode(msg.data, message_type)
            except MessageError as exc:
                self.malformed += 1
                log.warning("malformed message dropped", subject=msg.subject, error=str(exc))
                return
            reply: Reply | None = None
            if msg.reply:
                reply_to = msg.reply

                async def reply(answer: Any) -> None:
                    await self.client.publish(reply_to, encode(answer))

            try:
                await handler(message, reply)
            except Exception:  # a bug of ours: log it whole, and keep serving the subject
                log.exception("message handler failed", subject=msg.subject, message_type=message_type.__name__)

        return await self.client.subscribe(subject, queue=queue, cb=on_message)

    async def flush(self) -> None:
        await self.client.flush()

    async def close(self, timeout: float = 2.0) -> None:
        """Drain (let handlers finish, deliver what was published) when connected, then close; bounded.

        A drain needs the server: while reconnecting it is refused, and if the server goes away
        mid-drain its flush could wait far longer than `timeout`. So the drain gets `timeout`
        seconds and a plain close (which also stops reconnecting) is what ends every case; neither
        is awaited past its bound, and nothing is raised: a stopping service has nothing better to do.
        """
        client = self.client
        if client.is_closed:
            return
        if client.is_connected:
            drained = await _bounded(client.drain(), timeout)
            if not drained:
                log.warning("nats drain did not finish; closing", connection=client.options.get("name"))
        if not client.is_closed:
            await _bounded(client.close(), min(timeout, 1.0))


async def _bounded(work: Awaitable[None], timeout: float) -> bool:
    """Await `work` for at most `timeout` s; True if it ended without error. Never raises, never waits longer.

    Not `asyncio.wait_for`: it waits for the cancelled work to end, and nats-py's drain catches
    the cancellation and goes on to flush.
    """
    task = asyncio.ensure_future(work)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        return False
    return not task.cancelled() and task.exception() is None


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark an abandoned task's outcome as seen, so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()
