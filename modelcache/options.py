"""Which part of a model a pull materialises (globs, exposed sub-path), and the key suffix that tells
trees of one manifest with different options apart."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from modelcache.paths import PathFilter


@dataclass(frozen=True)
class PullOptions:
    """What part of a model to materialise: include/exclude globs and the exposed sub-path."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    subpath: str | None = None

    @property
    def path_filter(self) -> PathFilter:
        """The filter for these globs."""
        return PathFilter(self.include, self.exclude)

    def variant(self) -> str:
        """A short suffix that tells trees of one manifest with different options apart ('' for defaults)."""
        if not self.include and not self.exclude and self.subpath is None:
            return ""
        text = f"{self.path_filter.key()};subpath={self.subpath}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]
