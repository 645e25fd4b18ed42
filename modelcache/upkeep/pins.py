"""Pins, kept as a file under the cache root so every process on the node agrees: a pinned model is
never evicted."""

from __future__ import annotations

from pathlib import Path

from modelcache.fsutil import atomic_write_json, file_lock, read_json


class Pins:
    """``owner -> model keys`` (an owner is e.g. ``namespace/name`` of a ModelCache, which pins the revisions it
    keeps); stored as one key, or a list when an owner pins several."""

    def __init__(self, root: Path) -> None:
        self.path = root / "agent" / "pins.json"
        self.lock_path = root / "locks" / "pins.lock"

    def _load(self) -> dict[str, str | list[str]]:
        data = read_json(self.path)
        if not isinstance(data, dict):
            return {}
        return {str(k): [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in data.items()}

    def pin(self, owner: str, key: str, *more: str) -> None:
        """Pin ``key`` (and ``more``) on behalf of ``owner``, replacing what ``owner`` pinned before."""
        with file_lock(self.lock_path):
            pins = self._load()
            pins[owner] = [key, *more] if more else key
            atomic_write_json(self.path, pins)

    def unpin(self, owner: str) -> None:
        """Drop ``owner``'s pin."""
        with file_lock(self.lock_path):
            pins = self._load()
            if pins.pop(owner, None) is not None:
                atomic_write_json(self.path, pins)

    def retain(self, owners: set[str]) -> list[str]:
        """Drop the pins of every owner not in ``owners`` (objects deleted, unpinned or moved away while
        no one watched); return the owners dropped."""
        with file_lock(self.lock_path):
            pins = self._load()
            dropped = sorted(set(pins) - owners)
            if dropped:
                atomic_write_json(self.path, {k: v for k, v in pins.items() if k in owners})
        return dropped

    def pinned(self) -> set[str]:
        """Every pinned model key."""
        return {key for value in self._load().values() for key in ([value] if isinstance(value, str) else value)}
