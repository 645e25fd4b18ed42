"""Which revision of a tag each ModelCache holds on this node: one small JSON file per ModelCache under
``<root>/agent/revisions/``, written atomically by the node agent and read by the CSI node plugin, so that a volume
naming a covered tag is published from the node's current revision without asking the registry (the two
processes never import each other; this file is their contract).

``<root>/agent/revisions/<namespace>.<name>.json``::

    {"schemaVersion": 1, "owner": "inference/qwen", "reference": "registry.example.com/m/qwen:prod",
     "current": {"reference": "registry.example.com/m/qwen:prod@sha256:...", "digest": "sha256:...",
                 "key": "sha256-..."},
     "kept": [<current>, <older revisions, newest first>], "staged": "sha256:..." or "",
     "resolvedAt": 1767225600.0, "switchedAt": 1767225600.0, "maxStalenessSeconds": 300, "fixed": false}

``resolvedAt`` is when the agent last resolved the tag (Unix time); ``fixed`` is true when the ModelCache names
the revision itself (``spec.revision``), which never goes stale.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcache.errors import ModelCacheError
from modelcache.fsutil import atomic_write_json, read_json
from modelcache.registry.reference import Reference, parse_reference

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Revision:
    """One revision of a ModelCache's model on this node: the pinned reference it was pulled as, its digest and
    tree key."""

    reference: str
    digest: str
    key: str

    def to_json(self) -> dict[str, str]:
        """The stored form."""
        return {"reference": self.reference, "digest": self.digest, "key": self.key}

    @classmethod
    def from_json(cls, data: Any) -> Revision | None:
        """Rebuild from the stored form (None for anything malformed)."""
        if not isinstance(data, dict) or not all(isinstance(data.get(k), str) for k in ("reference", "digest", "key")):
            return None
        return cls(data["reference"], data["digest"], data["key"])


@dataclass
class RevisionState:
    """What one ModelCache holds on this node (see the module's documentation)."""

    owner: str
    reference: str
    current: Revision | None = None
    kept: list[Revision] = field(default_factory=list)
    staged: str = ""
    resolved_at: float = 0.0
    switched_at: float = 0.0
    max_staleness: float = 300.0
    fixed: bool = False

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        return {"schemaVersion": SCHEMA_VERSION, "owner": self.owner, "reference": self.reference,
                "current": self.current.to_json() if self.current else None,
                "kept": [r.to_json() for r in self.kept], "staged": self.staged, "resolvedAt": self.resolved_at,
                "switchedAt": self.switched_at, "maxStalenessSeconds": self.max_staleness, "fixed": self.fixed}

    @classmethod
    def from_json(cls, data: Any) -> RevisionState | None:
        """Rebuild from the stored form (None for another schema or anything malformed)."""
        if not isinstance(data, dict) or data.get("schemaVersion") != SCHEMA_VERSION:
            return None
        try:
            kept = [r for r in (Revision.from_json(item) for item in data.get("kept") or []) if r is not None]
            return cls(str(data["owner"]), str(data["reference"]), Revision.from_json(data.get("current")), kept,
                       str(data.get("staged") or ""), float(data.get("resolvedAt") or 0.0),
                       float(data.get("switchedAt") or 0.0), float(data.get("maxStalenessSeconds") or 0.0),
                       bool(data.get("fixed", False)))
        except (KeyError, TypeError, ValueError):
            return None

    def fresh(self, now: float) -> bool:
        """True when the current revision may stand for the tag at ``now``."""
        return self.fixed or 0 <= now - self.resolved_at <= self.max_staleness


def _tag_of(text: str) -> tuple[str, str, str] | None:
    """``(registry, repository, tag)`` of a reference (the default tag is ``latest``)."""
    try:
        ref = parse_reference(text)
    except ModelCacheError:
        return None
    return ref.registry, ref.repository, ref.tag or "latest"


class Revisions:
    """The revision files of one cache root."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "agent" / "revisions"  # agent/ is private to root (0700)

    def path(self, owner: str) -> Path:
        """The file of ModelCache ``namespace/name`` (a namespace holds no dot, so the name is unambiguous)."""
        namespace, _, name = owner.partition("/")
        return self.dir / f"{namespace}.{name}.json"

    def load(self, owner: str) -> RevisionState | None:
        """The state of ``owner``, or None."""
        return RevisionState.from_json(read_json(self.path(owner)))

    def save(self, state: RevisionState) -> None:
        """Write ``state`` atomically."""
        atomic_write_json(self.path(state.owner), state.to_json())

    def remove(self, owner: str) -> None:
        """Forget ``owner`` (the plugin stops serving its tag at once)."""
        self.path(owner).unlink(missing_ok=True)

    def states(self) -> list[RevisionState]:
        """Every readable state."""
        found = []
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.dir.glob("*.json")):
                state = RevisionState.from_json(read_json(path))
                if state is not None:
                    found.append(state)
        return found

    def retain(self, owners: set[str]) -> list[str]:
        """Remove the files of every owner not in ``owners``; return the owners removed."""
        dropped = sorted(s.owner for s in self.states() if s.owner not in owners)
        for owner in dropped:
            self.remove(owner)
        return dropped

    def serving(self, reference: Reference, now: float | None = None) -> Reference | None:
        """The node's current revision of tag ``reference`` (pinned to its digest) when a ModelCache that names
        that tag holds it and resolved it within its ``maxStalenessSeconds``; the most recently resolved one
        when several do; else None (ask the registry)."""
        if reference.digest is not None:
            return None
        wanted = _tag_of(str(reference))
        moment = time.time() if now is None else now
        candidates = [s for s in self.states() if s.current is not None and s.fresh(moment)
                      and _tag_of(s.reference) == wanted and _tag_of(s.current.reference) == wanted]
        if not candidates:
            return None
        best = max(candidates, key=lambda s: s.resolved_at)
        assert best.current is not None
        try:
            pinned = parse_reference(best.current.reference)
        except ModelCacheError:
            return None
        return pinned if pinned.digest is not None else None
