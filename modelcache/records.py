"""What the cache knows of a model: its record (``models/<key>.json``), the result of a pull, and the key
of its tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcache.assemble.options import PullOptions
from modelcache.digest import Digest


@dataclass
class ModelRecord:
    """What the store knows of one assembled tree; kept as ``models/<key>.json``."""

    key: str
    reference: str
    digest: str
    manifest_digest: str
    layout: str
    files: int
    total_bytes: int
    blobs: list[str]
    layers: list[str]
    subpath: str
    include: list[str]
    exclude: list[str]
    created: float
    auth_required: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecord:
        """Rebuild from the stored JSON."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class PullResult:
    """The outcome of a pull."""

    record: ModelRecord
    path: Path
    downloaded_bytes: int
    cached: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The JSON the CLI prints."""
        return {"reference": self.record.reference, "digest": self.record.digest,
                "manifest_digest": self.record.manifest_digest, "layout": self.record.layout,
                "path": str(self.path), "total_bytes": self.record.total_bytes,
                "downloaded_bytes": self.downloaded_bytes, "files": self.record.files, "cached": self.cached,
                "seconds": round(self.seconds, 3)}


def tree_key(digest: Digest, options: PullOptions) -> str:
    """The directory name of the tree for ``digest`` with ``options``."""
    variant = options.variant()
    return f"{digest.algorithm}-{digest.hex}" + (f"-{variant}" if variant else "")
