"""ModelCache objects: validated spec, the node label that marks where a model is ready."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from modelcache.assemble.options import PullOptions, parse_layer_kinds
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.reference import Reference, parse_reference

LABEL_PREFIX = "ocimodel.csi.dev/"
UPDATE_POLICIES = ("Pinned", "Follow")
DEFAULT_RESOLVE_INTERVAL = 300.0
MIN_RESOLVE_INTERVAL = 10.0
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


@dataclass(frozen=True)
class ModelCacheSpec:
    """What one ModelCache asks of the nodes it selects."""

    namespace: str
    name: str
    uid: str
    reference: Reference
    node_selector: tuple[tuple[str, str], ...]
    warm: bool
    lock: bool
    pin: bool
    pull_secrets: tuple[str, ...]
    update_policy: str = "Pinned"
    resolve_interval: float = DEFAULT_RESOLVE_INTERVAL
    keep_revisions: int = 2
    revision: Digest | None = None
    max_staleness: float | None = None  # None: the resolve interval
    layers: tuple[str, ...] = ()  # spec.layers: only these layer kinds (all when empty)

    @property
    def owner(self) -> str:
        """``namespace/name``."""
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: dict[str, str]) -> bool:
        """True when a node with ``labels`` should hold the model."""
        return all(labels.get(k) == v for k, v in self.node_selector)

    @property
    def options(self) -> PullOptions:
        """What of the model to pull: the layer kinds ``spec.layers`` names."""
        return PullOptions(layers=self.layers)

    @property
    def fixed(self) -> Reference | None:
        """The revision the object names itself (``spec.revision``, or a reference with a digest), or None."""
        if self.revision is not None:
            return self.reference.with_digest(self.revision)
        return self.reference if self.reference.digest else None

    @property
    def follows(self) -> bool:
        """True when the agent keeps resolving the tag (``updatePolicy: Follow`` without a fixed revision)."""
        return self.update_policy == "Follow" and self.fixed is None

    @property
    def staleness(self) -> float:
        """How long a resolved revision may stand for the tag (``maxStalenessSeconds``)."""
        return self.resolve_interval if self.max_staleness is None else self.max_staleness


def parse_spec(obj: dict[str, Any]) -> ModelCacheSpec:
    """Validate a ModelCache object; raise INVALID_ARGUMENT with a message fit for its status."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    if not isinstance(spec, dict):
        raise ModelCacheError("spec must be an object", kind=Kind.INVALID_ARGUMENT)
    reference = parse_reference(str(spec.get("reference", "")))
    selector = spec.get("nodeSelector") or {}
    page_cache = spec.get("pageCache") or {}
    secrets = spec.get("pullSecrets") or []
    if not isinstance(selector, dict) or not isinstance(page_cache, dict) or not isinstance(secrets, list):
        raise ModelCacheError("nodeSelector and pageCache must be objects, pullSecrets a list",
                              kind=Kind.INVALID_ARGUMENT)
    secret_names = []
    for entry in secrets:
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ModelCacheError("each pullSecrets entry needs a name", kind=Kind.INVALID_ARGUMENT)
        secret_names.append(str(entry["name"]))
    return ModelCacheSpec(namespace, name, str(meta.get("uid", "")), reference,
                          tuple(sorted((str(k), str(v)) for k, v in selector.items())),
                          bool(page_cache.get("warm", False)), bool(page_cache.get("lock", False)),
                          bool(spec.get("pin", False)), tuple(secret_names), *_revision_fields(spec),
                          layers=parse_layer_kinds(str(spec.get("layers") or "")))


def _revision_fields(spec: dict[str, Any]) -> tuple[str, float, int, Digest | None, float | None]:
    """``updatePolicy``, ``resolveIntervalSeconds``, ``keepRevisions``, ``revision``, ``maxStalenessSeconds``."""
    policy = str(spec.get("updatePolicy") or "Pinned")
    if policy not in UPDATE_POLICIES:
        raise ModelCacheError(f"updatePolicy must be one of {', '.join(UPDATE_POLICIES)}, not {policy!r}",
                              kind=Kind.INVALID_ARGUMENT)
    try:
        interval = float(spec.get("resolveIntervalSeconds", DEFAULT_RESOLVE_INTERVAL))
        keep = int(spec.get("keepRevisions", 2))
        staleness = None if spec.get("maxStalenessSeconds") is None else float(spec["maxStalenessSeconds"])
        revision = Digest.parse(str(spec["revision"])) if spec.get("revision") else None
    except (TypeError, ValueError) as exc:
        raise ModelCacheError(f"revision fields: {exc}", kind=Kind.INVALID_ARGUMENT) from None
    if interval < MIN_RESOLVE_INTERVAL or keep < 1 or (staleness is not None and staleness < 0):
        raise ModelCacheError(f"need resolveIntervalSeconds >= {MIN_RESOLVE_INTERVAL:g}, keepRevisions >= 1 and "
                              f"maxStalenessSeconds >= 0", kind=Kind.INVALID_ARGUMENT)
    return policy, interval, keep, revision, staleness


def node_labels(spec: ModelCacheSpec, digest: str | None) -> dict[str, str | None]:
    """The labels that mark where ``spec``'s model is ready: ``<namespace>.<name>: ready`` and
    ``<namespace>.<name>_revision: <12 hex digits of the current revision>`` (None for both removes them)."""
    short = digest.partition(":")[2][:12] if digest else None
    return {node_label(spec.namespace, spec.name): "ready" if digest else None,
            node_label(spec.namespace, spec.name, "_revision"): short}


def node_label(namespace: str, name: str, suffix: str = "") -> str:
    """``ocimodel.csi.dev/<namespace>.<name><suffix>``, shortened with a hash to fit the 63-character name limit
    (a suffix starting with ``_`` never collides with another object's label: names hold no ``_``)."""
    base = f"{namespace}.{name}{suffix}"
    if len(base) > 63 or not _LABEL_NAME.match(base):
        digest = hashlib.sha256(base.encode()).hexdigest()[:10]
        cleaned = re.sub(r"[^-A-Za-z0-9_.]", "-", base)[: 63 - 11].strip("-_.")
        base = f"{cleaned}-{digest}"
    return LABEL_PREFIX + base
