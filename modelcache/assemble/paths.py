"""Validation of file paths that come from a registry (annotations, tar entries)."""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Sequence

from modelcache.errors import UnsafeContent

MAX_PATH = 4096
MAX_COMPONENT = 255


def safe_relpath(path: str, what: str) -> str:
    """Normalise ``path`` to a relative POSIX path inside a tree, or raise :class:`UnsafeContent`."""
    if not path or "\x00" in path or len(path) > MAX_PATH:
        raise UnsafeContent(f"{what}: path {path[:80]!r} is empty, too long or contains NUL")
    if path.startswith("/") or path.startswith("\\"):
        raise UnsafeContent(f"{what}: absolute path {path!r} is not allowed")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise UnsafeContent(f"{what}: path {path!r} names the tree root")
    for part in parts:
        if part == "..":
            raise UnsafeContent(f"{what}: path {path!r} climbs out of the tree with '..'")
        if len(part.encode()) > MAX_COMPONENT:
            raise UnsafeContent(f"{what}: a component of {path[:80]!r} is longer than {MAX_COMPONENT} bytes")
    return posixpath.join(*parts)


class PathFilter:
    """Include/exclude glob patterns on tree paths; a pattern without '/' also matches the base name."""

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.include = tuple(p.strip() for p in include if p.strip())
        self.exclude = tuple(p.strip() for p in exclude if p.strip())

    @staticmethod
    def _match(path: str, pattern: str) -> bool:
        pattern = pattern.lstrip("/")
        if fnmatch.fnmatchcase(path, pattern):
            return True
        if "/" not in pattern:
            return fnmatch.fnmatchcase(posixpath.basename(path), pattern)
        return pattern.endswith("/") and path.startswith(pattern)

    def accepts(self, path: str) -> bool:
        """True when ``path`` is kept."""
        if self.include and not any(self._match(path, p) for p in self.include):
            return False
        return not any(self._match(path, p) for p in self.exclude)

    def key(self) -> str:
        """A stable text form, part of a tree's identity."""
        return f"include={','.join(sorted(self.include))};exclude={','.join(sorted(self.exclude))}"
