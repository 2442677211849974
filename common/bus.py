"""The control plane: a NATS connection that sends and receives only our typed messages.

Request/reply carries a timeout, so "nobody is serving that subject" is an immediate
`ServiceUnavailable` (NATS answers "no responders" at once) and a hung peer is one after the
timeout, never a hang. A malformed message is logged, counted and dropped: one bad peer must
not take a subscriber down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from common.errors import AdrenalineError
from common.messages import MessageError, decode, encode

log = structlog.get_logger(__name__)
M = TypeVar("M")
Reply = Callable[[Any], Awaitable[None]]


class ServiceUnavailable(AdrenalineError):
    """Nobody answered on a subject in time: no instance is up, or it is stuck."""

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject


class Bus:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.malformed = 0  # messages dropped because they did not decode

    @classmethod
    async def connect(cls, url: str, name: str) -> Bus:
        client = await nats.connect(url, name=name, connect_timeout=5, max_reconnect_attempts=-1)
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

            await handler(message, reply)

        return await self.client.subscribe(subject, queue=queue, cb=on_message)

    async def flush(self) -> None:
        await self.client.flush()

    async def close(self) -> None:
        if not self.client.is_closed:
            await self.client.drain()
