"""Pins and warm requests, kept as files under the cache root so every process on the node agrees:
a pinned model is never evicted; a warm request asks the node agent to warm a published model."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

from modelcache.fsutil import atomic_write_json, file_lock, read_json


class Pins:
    """``owner -> model key`` (an owner is e.g. ``namespace/name`` of a ModelCache)."""

    def __init__(self, root: Path) -> None:
        self.path = root / "agent" / "pins.json"
        self.lock_path = root / "locks" / "pins.lock"

    def _load(self) -> dict[str, str]:
        data = read_json(self.path)
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def pin(self, owner: str, key: str) -> None:
        """Pin ``key`` on behalf of ``owner``."""
        with file_lock(self.lock_path):
            pins = self._load()
            pins[owner] = key
            atomic_write_json(self.path, pins)

    def unpin(self, owner: str) -> None:
        """Drop ``owner``'s pin."""
        with file_lock(self.lock_path):
            pins = self._load()
            if pins.pop(owner, None) is not None:
                atomic_write_json(self.path, pins)

    def pinned(self) -> set[str]:
        """Every pinned model key."""
        return set(self._load().values())


class WarmRequests:
    """A spool directory of requests to warm a model's tree into page cache."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "agent" / "warm-requests"

    def request(self, key: str, path: str) -> None:
        """Ask for ``path`` (the tree of ``key``) to be warmed."""
        name = hashlib.sha256(f"{key}|{path}".encode()).hexdigest()[:24]
        atomic_write_json(self.dir / f"{name}.json", {"key": key, "path": path, "requested": time.time()})

    def take(self) -> list[dict[str, str]]:
        """Every pending request, removed from the spool."""
        if not self.dir.is_dir():
            return []
        result = []
        for file in sorted(self.dir.glob("*.json")):
            data = read_json(file)
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
            if isinstance(data, dict) and "path" in data:
                result.append({"key": str(data.get("key", "")), "path": str(data["path"])})
        return result


