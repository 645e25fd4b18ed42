"""Progress of one pull, shared between the thread that pulls and those that report it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Thread-safe progress of one pull, readable from other threads."""

    phase: str = "resolving"
    total_bytes: int = 0
    done_bytes: int = 0
    downloaded_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    listeners: list[Callable[[Progress], None]] = field(default_factory=list, repr=False)

    def advance(self, n: int) -> None:
        """Count ``n`` bytes fetched from the network."""
        with self._lock:
            self.done_bytes += n
            self.downloaded_bytes += n
        for listener in self.listeners:
            listener(self)

    def skip(self, n: int) -> None:
        """Count ``n`` bytes that were already on disk (a resumed ingest)."""
        with self._lock:
            self.done_bytes += n

    def set(self, phase: str, total: int | None = None, done: int | None = None) -> None:
        """Move to ``phase``, optionally resetting the byte totals."""
        with self._lock:
            self.phase = phase
            if total is not None:
                self.total_bytes = total
            if done is not None:
                self.done_bytes = done
        for listener in self.listeners:
            listener(self)

    def describe(self) -> str:
        """One line for humans."""
        with self._lock:
            if self.total_bytes:
                pct = 100.0 * self.done_bytes / self.total_bytes
                return f"{self.phase}: {self.done_bytes}/{self.total_bytes} bytes ({pct:.1f}%)"
            return self.phase
