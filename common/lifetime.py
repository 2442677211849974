"""Process lifetimes: children that die with their parent, and a bounded exit after a stop signal.

`adrenaline up` and the tests start nats-server and every service in a session of its own (so a
terminal's Ctrl-C reaches only the launcher, which then stops them in order). A process in
another session gets no signal when its parent dies, so without `die_with_parent` a launcher
killed with SIGKILL would leave the whole cluster running.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up in the parent: the forked child must do as little as it can."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    fn: Callable[..., int] = prctl
    return fn


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A `Popen(preexec_fn=...)` that has the child sent `sig` when this process dies (Linux only).

    SIGKILL by default: the parent is gone, so nobody will wait for a clean shutdown, and a child
    that is still importing or stuck must go too. The kernel ties PR_SET_PDEATHSIG to the *thread*
    that forked, so call Popen from a thread that lives as long as the children should (the main
    thread, in the launcher and the tests). None where prctl is not available.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: the signal will never come
            os.kill(os.getpid(), sig)

    return preexec


def exit_now(code: int) -> None:
    """Leave at once, skipping cleanup that may hang (joining worker threads, closing sockets)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream must not stop the exit
            stream.flush()
    os._exit(code)


def exit_after(seconds: float, code: int) -> threading.Timer:
    """Force the exit `seconds` from now unless the process has ended by then.

    A daemon thread, so a clean exit before then is not held up by it, and it fires even while the
    event loop is blocked or the interpreter is joining worker threads at exit.
    """
    timer = threading.Timer(seconds, exit_now, args=(code,))
    timer.daemon = True
    timer.start()
    return timer
