"""NATS connections whose TCP segments stay small: no window-below-MSS stall after a server pause.

Seen on this project's machines (Linux 6.18, loopback, MTU 65536, so an MSS of ~64 KiB): when
nats-server stops reading for a few seconds (a pause, a GC, a starved core) while a service keeps
publishing small messages, the server's socket fills with small segments, the kernel prunes it,
and its receive window comes back clamped (51,200 bytes once) below the sender's MSS (60,928).
The sender may then only probe the window (`ss`: `timer:(persist)`, `snd_wnd` < `mss`, nothing
sent for minutes) while the server, its queue empty, waits for data: the service's publishes and
heartbeats go nowhere, although both processes are healthy, until nats-py's pings find the
connection stale (two missed pings, minutes by default). A fault test caught a decode instance
this way, judged dead and useless for five minutes after a three-second NATS pause.

Announcing a small MSS (`TCP_MAXSEG`, set before connecting, so it bounds the segments both ways)
keeps every segment far below any window the kernel clamps to, so the stall cannot form. The cost
is nothing that matters for a control plane: a few more segments per large message on loopback;
on a real network the path's MTU already keeps the MSS below it.

nats-py opens its TCP connection itself, in `TcpTransport.connect`, with no way to pass a socket,
so `install()` replaces that method process-wide; every NATS client in our processes is ours.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from nats.aio import transport

MSS_BYTES = 8192  # well below the smallest clamped window seen (51,200), and above any real path's MSS

_installed = False


async def _connect(self: Any, uri: Any, buffer_size: int, connect_timeout: int) -> None:
    """nats-py's `TcpTransport.connect`, on a socket that announces `MSS_BYTES`."""
    infos = await asyncio.get_running_loop().getaddrinfo(uri.hostname, uri.port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, MSS_BYTES)
            sock.setblocking(False)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, address), connect_timeout)
        except (OSError, TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else OSError(f"connect to {address} timed out")
            continue
        reader, writer = await asyncio.open_connection(sock=sock, limit=buffer_size)
        # as nats-py keeps them: the bare pair survives a TLS upgrade (nats-io/asyncio-nats#43)
        self._bare_io_reader = self._io_reader = reader
        self._bare_io_writer = self._io_writer = writer
        return
    raise last or OSError(f"no address for {uri.hostname}")


def install() -> None:
    """Make every nats-py TCP connection of this process announce `MSS_BYTES` (idempotent)."""
    global _installed
    if not _installed and hasattr(socket, "TCP_MAXSEG"):
        transport.TcpTransport.connect = _connect  # type: ignore[method-assign]
        _installed = True
