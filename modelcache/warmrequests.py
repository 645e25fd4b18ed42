"""Warm requests: a spool directory under the cache root through which the CSI driver asks the node agent
to read a published model into page cache."""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path

from modelcache.fsutil import atomic_write_json, read_json


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


