"""Chunks of one blob fetched on demand by a lazy mount into a sparse file under ``<root>/lazy``."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

RANGE_CHUNK = 4 << 20  # a lazy read fetches whole chunks of this size by HTTP Range


class ChunkCache:
    """Chunks of one blob fetched on demand into a sparse file; which chunks are present is kept in memory.

    Readers hold it while they read (:meth:`enter`/:meth:`leave`); :meth:`retire` stops new readers and
    waits for the current ones, so comparing and closing never race a read (a closed descriptor number
    can be reused by another file at once)."""

    def __init__(self, path: Path, size: int, chunk_size: int = RANGE_CHUNK) -> None:
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.present: set[int] = set()
        self.inflight: dict[int, threading.Event] = {}
        self.lock = threading.Lock()
        self._idle = threading.Condition(self.lock)
        self._users = 0
        self.retired = False
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # held while in use: gc removes only unlocked leftovers
        os.ftruncate(self.fd, size)

    def enter(self) -> bool:
        """Start using the cache; False once it is retired (read the committed blob instead)."""
        with self.lock:
            if self.retired:
                return False
            self._users += 1
            return True

    def leave(self) -> None:
        """Stop using the cache."""
        with self.lock:
            self._users -= 1
            if not self._users:
                self._idle.notify_all()

    def retire(self) -> None:
        """Let no new reader in and wait for the current ones."""
        with self.lock:
            self.retired = True
            while self._users:
                self._idle.wait()

    def close(self) -> None:
        """Retire, close and delete the sparse file."""
        self.retire()
        os.close(self.fd)
        self.path.unlink(missing_ok=True)

    def discard(self) -> None:
        """At process exit: let no reader in and delete the file without waiting for fetches in flight (the
        descriptor stays open for them and ends with the process)."""
        with self.lock:
            self.retired = True
        self.path.unlink(missing_ok=True)
