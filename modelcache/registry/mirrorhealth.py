"""Which registry mirrors are down, per process. A mirror that refused a connection or could not be reached
is skipped for a hold-off (30 s, doubling while it stays down, up to 5 min); when the hold-off ends, one
request tries it again. Going down and coming back are each logged once."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

FIRST_HOLD_OFF = 30.0
LONGEST_HOLD_OFF = 300.0


@dataclass
class _Down:
    since: float
    hold_off: float
    until: float
    retrying: bool = False  # a caller was let through to try it again


class MirrorHealth:
    """Down mirrors by URL, thread-safe; ``down_counts`` and ``skipped`` feed the metrics."""

    def __init__(self, first: float = FIRST_HOLD_OFF, longest: float = LONGEST_HOLD_OFF,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first = first
        self.longest = longest
        self._clock = clock
        self._down: dict[str, _Down] = {}
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def usable(self, mirror: str) -> bool:
        """Whether to send a request to ``mirror`` now: it is up, or its hold-off has ended and this caller is
        the one that tries it again (the others keep skipping it until that try has an answer)."""
        with self._lock:
            down = self._down.get(mirror)
            if down is None:
                return True
            now = self._clock()
            if now < down.until:
                return False
            down.until, down.retrying = now + down.hold_off, True  # reserved for this caller's try
            return True

    def failed(self, mirror: str, reason: str) -> None:
        """``mirror`` refused or could not be reached: skip it for a hold-off; when a try after a hold-off
        failed, for twice as long as the last one (failures of requests sent before it was found down
        change nothing)."""
        with self._lock:
            now = self._clock()
            down = self._down.get(mirror)
            if down is None:
                self._down[mirror] = _Down(now, self.first, now + self.first)
                self._counts[mirror] = self._counts.get(mirror, 0) + 1
                log.warning("mirror %s is down (%s): skipping it for %.0f s", mirror, reason, self.first)
                return
            if down.retrying:
                down.hold_off = min(down.hold_off * 2, self.longest)
                down.until, down.retrying = now + down.hold_off, False

    def answered(self, mirror: str) -> None:
        """``mirror`` answered a request (with any status): it is up."""
        with self._lock:
            down = self._down.pop(mirror, None)
            if down is not None:
                log.warning("mirror %s is back after %.0f s", mirror, self._clock() - down.since)

    def down_counts(self) -> dict[str, int]:
        """How often each mirror went down since the process started."""
        with self._lock:
            return dict(self._counts)

    def skipped(self) -> int:
        """Mirrors currently down."""
        with self._lock:
            return len(self._down)


MIRRORS = MirrorHealth()
