"""A floor on how slowly a registry may send a body. A socket's read timeout bounds each wait for a byte, not a
read: a registry that trickles a byte now and then would hold a lazy read, a pull worker and one of the node's
range connections for as long as it likes. Each read of a body gets a deadline (a grace period plus its size
at the floor speed); a watchdog thread shuts the connection of a read that passes it, so the read ends and
its caller fails it (:class:`RegistryError`)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

from modelcache.errors import Kind, RegistryError

TICK_SECONDS = 0.25  # how often the watchdog looks at the reads under way


class _Read:
    __slots__ = ("sock", "deadline", "fired")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.fired = sock, deadline, False


class _Watchdog:
    """One thread for the process, awake only while reads are under way."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._reads: set[_Read] = set()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, sock: socket.socket, deadline: float) -> Iterator[Callable[[], bool]]:
        """Shut ``sock`` down if the block is still running at ``deadline``; yields a function that tells,
        once the block has ended, whether that happened."""
        read = _Read(sock, deadline)
        with self._cond:
            self._reads.add(read)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="slow-bodies", daemon=True)
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
                    with contextlib.suppress(OSError):
                        read.sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns; the connection is dropped
                self._cond.wait(TICK_SECONDS)


_WATCHDOG = _Watchdog()


def guarded(readinto: Callable[[bytearray], int], sock: socket.socket, length: int | None, *, floor: float,
            grace: float, what: str) -> Callable[[bytearray], int]:
    """``readinto`` of a body of ``length`` bytes (None: unknown) whose every call must end within ``grace``
    seconds plus the bytes it may read at ``floor`` bytes per second; RegistryError (UNAVAILABLE) when one
    does not."""
    left = length

    def read(buffer: bytearray) -> int:
        nonlocal left
        size = len(buffer) if left is None else min(len(buffer), max(left, 0))
        error: Exception | None = None
        n = 0
        with _WATCHDOG.watch(sock, time.monotonic() + grace + size / floor) as fired:
            try:
                n = readinto(buffer)
            except Exception as exc:  # noqa: BLE001 - a read the watchdog cut fails in its own way: said below
                error = exc
        if fired():
            raise RegistryError(f"{what}: the registry sent the body slower than {floor:.0f} bytes per second; "
                                f"connection dropped", kind=Kind.UNAVAILABLE)
        if error is not None:
            raise error
        if left is not None:
            left -= n
        return n
    return read
