"""Waiting for a state rather than for a time: a deadline here only guards against a hang, generous enough
that a busy machine never meets it (how fast something happens is measured in bench/, not asserted)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def ends(call: Callable[[], object], hang_guard: float = 120.0) -> BaseException | None:
    """Run ``call`` in a thread: what it raised (None if it returned), or a failure if it is still running
    after ``hang_guard`` seconds (a call that waits for good, e.g. on a lock or a read that never fails)."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:  # handed to the caller
            raised.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(hang_guard)
    assert raised, f"still running after {hang_guard} s: a hang"
    return raised[0]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll ``predicate`` until it is true and return its value; ``timeout`` only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not (found := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return found


def timed_read(path: Path, offset: int, size: int,
               hang_guard: float = 120.0) -> tuple[BaseException | bytes | None, float]:
    """Read in a thread; what it returned or raised, and after how long (None: still blocked at the guard)."""
    outcome: list[BaseException | bytes] = []

    def run() -> None:
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                outcome.append(handle.read(size))
        except OSError as exc:
            outcome.append(exc)
    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(hang_guard)
    return (outcome[0] if outcome else None), time.monotonic() - started
