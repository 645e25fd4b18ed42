"""A floor on how slowly a registry may answer. A socket's read timeout bounds each wait for a byte, not a
read: a registry that trickles a byte now and then would hold a lazy read, a pull worker and one of the node's
range connections for as long as it likes. Each read of a blob body gets a deadline (a grace period plus its
size at the floor speed), and so do an answer's headers (:data:`HEADER_BYTES` at the floor) and a small body
read whole (its limit at the floor); a watchdog thread shuts the connection of a read that passes it, so the
read ends and its caller fails it (:class:`RegistryError`, UNAVAILABLE)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

from modelcache.errors import Kind, RegistryError

log = logging.getLogger(__name__)

FLOOR = 16 << 10  # bytes per second: the slowest a registry may send
HEADER_BYTES = 64 << 10  # the headers of an answer are given this many bytes' time at the floor
DEFAULT_GRACE = 30.0  # seconds, where a socket has no timeout of its own
TICK_SECONDS = 0.25  # how often the watchdog looks at the reads under way


def too_slow(what: str, floor: float) -> RegistryError:
    """The error of a read the watchdog cut."""
    return RegistryError(f"{what}: the registry sent slower than {floor:.0f} bytes per second; connection dropped",
                         kind=Kind.UNAVAILABLE)


def grace_of(sock: socket.socket) -> float:
    """The socket's own read timeout, the grace every deadline on it starts with."""
    timeout = sock.gettimeout()
    return DEFAULT_GRACE if timeout is None else timeout


class _Read:
    __slots__ = ("sock", "deadline", "fired")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.fired = sock, deadline, False


class _Watchdog:
    """One thread for the process, awake only while reads are under way (started again if it ever ended,
    and in a forked child)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reads: set[_Read] = set()
        self._thread: threading.Thread | None = None

    def reset(self) -> None:
        """In a forked child: no thread, no reads (the parent's are not this process's)."""
        self._cond = threading.Condition()
        self._reads = set()
        self._thread = None

    @contextlib.contextmanager
    def watch(self, sock: socket.socket, deadline: float) -> Iterator[Callable[[], bool]]:
        """Shut ``sock`` down if the block is still running at ``deadline``; yields a function that tells,
        once the block has ended, whether that happened."""
        read = _Read(sock, deadline)
        with self._cond:
            self._reads.add(read)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="slow-answers", daemon=True)
                self._thread.start()
            elif len(self._reads) == 1:
                self._cond.notify()
        fired = False
        try:
            yield lambda: fired
        finally:
            with self._cond:
                self._reads.discard(read)
                fired = read.fired

    def _run(self) -> None:
        with self._cond:
            while True:
                while not self._reads:
                    self._cond.wait()
                now = time.monotonic()
                for read in [r for r in self._reads if r.deadline <= now]:
                    read.fired = True
                    self._reads.discard(read)
                    try:
                        read.sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns; the connection is dropped
                    except Exception as exc:  # noqa: BLE001 - one socket's failure must not end the watchdog
                        log.debug("could not shut down a slow connection: %s", exc)
                self._cond.wait(TICK_SECONDS)


_WATCHDOG = _Watchdog()
os.register_at_fork(after_in_child=_WATCHDOG.reset)


def bounded(call: Callable[[], object], sock: socket.socket, seconds: float, what: str, floor: float) -> object:
    """``call()``, its connection ``sock`` shut down if it runs longer than ``seconds`` (then
    :func:`too_slow`, whatever the call raised)."""
    error: Exception | None = None
    result: object = None
    with _WATCHDOG.watch(sock, time.monotonic() + seconds) as fired:
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - a call the watchdog cut fails in its own way: said below
            error = exc
    if fired():
        raise too_slow(what, floor)
    if error is not None:
        raise error
    return result


def guarded(readinto: Callable[[bytearray], int], sock: socket.socket, length: int | None, *, floor: float,
            what: str) -> Callable[[bytearray], int]:
    """``readinto`` of a body of ``length`` bytes still to come (None: unknown) whose every call must end
    within the socket's read timeout plus the bytes it may read at ``floor`` bytes per second; RegistryError
    (UNAVAILABLE) when one does not."""
    left = length
    grace = grace_of(sock)

    def read(buffer: bytearray) -> int:
        nonlocal left
        size = len(buffer) if left is None else min(len(buffer), max(left, 0))
        n = bounded(lambda: readinto(buffer), sock, grace + size / floor, what, floor)
        assert isinstance(n, int)
        if left is not None:
            left -= n
        return n
    return read
