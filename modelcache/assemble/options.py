"""Which part of a model a pull materialises (globs, exposed sub-path, layer kinds), and the key suffix that
tells trees of one manifest with different options apart."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from modelcache.assemble.paths import PathFilter
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.mediatypes import LAYER_KINDS


def parse_layer_kinds(text: str) -> tuple[str, ...]:
    """A comma list of layer kinds (``weights,config,code,datasets,docs``), sorted; () for all of them."""
    kinds = sorted({k.strip() for k in text.split(",") if k.strip()})
    unknown = [k for k in kinds if k not in LAYER_KINDS]
    if unknown:
        raise ModelCacheError(f"unknown layer kinds {unknown}; known: {', '.join(LAYER_KINDS)}",
                              kind=Kind.INVALID_ARGUMENT)
    return tuple(kinds)


@dataclass(frozen=True)
class PullOptions:
    """What part of a model to materialise: include/exclude globs, the exposed sub-path and the layer kinds
    (empty: all; others are never downloaded)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    subpath: str | None = None
    layers: tuple[str, ...] = ()

    @property
    def path_filter(self) -> PathFilter:
        """The filter for these globs."""
        return PathFilter(self.include, self.exclude)

    def variant(self) -> str:
        """A short suffix that tells trees of one manifest with different options apart ('' for defaults)."""
        if not self.include and not self.exclude and self.subpath is None and not self.layers:
            return ""
        text = f"{self.path_filter.key()};subpath={self.subpath}"
        if self.layers:  # absent otherwise, so the keys of trees pulled before layer kinds existed stay
            text += f";layers={','.join(sorted(self.layers))}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]
