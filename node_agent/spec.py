"""ModelCache objects: validated spec, the node label that marks where a model is ready."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from modelcache.errors import Kind, ModelCacheError
from modelcache.reference import Reference, parse_reference

LABEL_PREFIX = "ocimodel.csi.dev/"
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

    @property
    def owner(self) -> str:
        """``namespace/name``."""
        return f"{self.namespace}/{self.name}"

    def selects(self, labels: dict[str, str]) -> bool:
        """True when a node with ``labels`` should hold the model."""
        return all(labels.get(k) == v for k, v in self.node_selector)


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
                          bool(spec.get("pin", False)), tuple(secret_names))


def node_label(namespace: str, name: str) -> str:
    """``ocimodel.csi.dev/<namespace>.<name>``, shortened with a hash to fit the 63-character name limit."""
    base = f"{namespace}.{name}"
    if len(base) > 63 or not _LABEL_NAME.match(base):
        digest = hashlib.sha256(base.encode()).hexdigest()[:10]
        cleaned = re.sub(r"[^-A-Za-z0-9_.]", "-", base)[: 63 - 11].strip("-_.")
        base = f"{cleaned}-{digest}"
    return LABEL_PREFIX + base
