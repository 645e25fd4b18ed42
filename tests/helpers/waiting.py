"""Waiting for a state rather than for a time: a deadline here only guards against a hang, generous enough
that a busy machine never meets it (how fast something happens is measured in bench/, not asserted)."""

from __future__ import annotations

import threading
from collections.abc import Callable


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
