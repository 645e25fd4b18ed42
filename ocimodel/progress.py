"""A progress line on a terminal for long pulls."""

from __future__ import annotations

import sys
import threading
import time

from modelcache.progress import Progress


class ProgressLine:
    """Redraws ``progress`` on stderr every few tenths of a second while active (only on a terminal)."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress = progress
        self.label = label
        self.enabled = sys.stderr.isatty()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = time.monotonic()

    def __enter__(self) -> ProgressLine:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            elapsed = max(time.monotonic() - self._started, 1e-6)
            p = self.progress
            width = 30
            fraction = p.done_bytes / p.total_bytes if p.total_bytes else 0.0
            bar = "#" * int(width * fraction) + "-" * (width - int(width * fraction))
            rate = p.downloaded_bytes / elapsed / 1e6
            sys.stderr.write(f"\r{self.label} [{bar}] {p.phase} {p.done_bytes / 1e6:,.1f}/"
                             f"{p.total_bytes / 1e6:,.1f} MB {rate:,.0f} MB/s\x1b[K")
            sys.stderr.flush()
