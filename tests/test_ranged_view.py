"""What a lazy reader sees of a ranged download under way (RangedView): it waits for bytes a stream is about
to write, also when the stream is half-way through them, and not for bytes no stream is coming to."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from modelcache.store.rangedingest import STATE_VERSION, RangedView

MIB = 1 << 20


def _write_state(state: Path, filled: list[list[int]]) -> None:
    temporary = state.with_name(state.name + ".tmp")
    temporary.write_text(json.dumps({"version": STATE_VERSION, "mark": "m", "filled": filled}))
    temporary.replace(state)


def _wait_in_thread(view: RangedView, start: int, end: int) -> tuple[threading.Thread, list[bool]]:
    answers: list[bool] = []
    thread = threading.Thread(target=lambda: answers.append(view.wait_on_disk(start, end, 120, 64 * MIB, "m")))
    thread.start()
    return thread, answers


def test_a_reader_waits_for_a_stream_half_way_through_its_bytes(tmp_path: Path) -> None:
    state = tmp_path / "blob.ranged.json"
    _write_state(state, [[0, 6 * MIB]])  # the lead is inside the chunk [4, 8) MiB
    view = RangedView(tmp_path / "blob.ranged", state)
    thread, answers = _wait_in_thread(view, 4 * MIB, 8 * MIB)
    thread.join(0.5)  # a reader that gave up answers at once; one that waits has not answered
    assert thread.is_alive() and not answers
    _write_state(state, [[0, 9 * MIB]])
    thread.join(120)
    assert answers == [True]


def test_a_reader_waits_for_a_stream_just_before_its_bytes(tmp_path: Path) -> None:
    state = tmp_path / "blob.ranged.json"
    _write_state(state, [[0, 2 * MIB]])
    view = RangedView(tmp_path / "blob.ranged", state)
    thread, answers = _wait_in_thread(view, 4 * MIB, 8 * MIB)
    _write_state(state, [[0, 8 * MIB]])
    thread.join(120)
    assert answers == [True]


def test_a_reader_does_not_wait_for_bytes_no_stream_is_coming_to(tmp_path: Path) -> None:
    state = tmp_path / "blob.ranged.json"
    _write_state(state, [[0, 2 * MIB], [80 * MIB, 90 * MIB]])  # nothing near [70, 74) MiB, nor inside it
    view = RangedView(tmp_path / "blob.ranged", state)
    assert view.wait_on_disk(70 * MIB, 74 * MIB, 120, 64 * MIB, "m") is False
