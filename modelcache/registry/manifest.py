"""Parsing and validation of OCI/Docker manifests and indexes received from a registry."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from typing import Any

from modelcache.digest import Digest
from modelcache.errors import IntegrityError, UnsupportedArtifact
from modelcache.registry import mediatypes as mt

MAX_MANIFEST_BYTES = 4 << 20
MAX_LAYERS = 100_000
MAX_BLOB_SIZE = 1 << 44  # 16 TiB: anything larger is a lie


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor."""

    media_type: str
    digest: Digest
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] = field(default_factory=dict)
    artifact_type: str = ""
    has_urls: bool = False

    @classmethod
    def from_json(cls, data: Any, where: str) -> Descriptor:
        """Validate one descriptor object."""
        if not isinstance(data, dict):
            raise IntegrityError(f"{where}: descriptor is not an object")
        media_type = data.get("mediaType")
        size = data.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise IntegrityError(f"{where}: descriptor has no mediaType")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size > MAX_BLOB_SIZE:
            raise IntegrityError(f"{where}: descriptor size {size!r} is not a sane byte count")
        try:
            digest = Digest.parse(str(data.get("digest", "")))
        except ValueError as exc:
            raise IntegrityError(f"{where}: {exc}") from None
        annotations = data.get("annotations") or {}
        plat = data.get("platform") or {}
        if not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values()):
            raise IntegrityError(f"{where}: annotations must map strings to strings")
        if not isinstance(plat, dict):
            raise IntegrityError(f"{where}: platform must be an object")
        return cls(media_type, digest, size, dict(annotations), {k: str(v) for k, v in plat.items()},
                   str(data.get("artifactType") or ""), bool(data.get("urls")))


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker v2)."""

    media_type: str
    digest: Digest
    config: Descriptor
    layers: tuple[Descriptor, ...]
    artifact_type: str = ""
    annotations: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list."""

    media_type: str
    digest: Digest
    manifests: tuple[Descriptor, ...]


def _load(raw: bytes, where: str) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{where}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{where}: manifest is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise IntegrityError(f"{where}: manifest is not a JSON object")
    if data.get("schemaVersion") != 2:
        raise UnsupportedArtifact(f"{where}: schemaVersion {data.get('schemaVersion')!r} is not supported (need 2)")
    return data


def parse_manifest(raw: bytes, media_type: str, digest: Digest, where: str) -> Manifest | Index:
    """Parse ``raw`` (already digest-verified) as a manifest or index, by its declared media type."""
    data = _load(raw, where)
    declared = data.get("mediaType") or media_type
    if media_type and data.get("mediaType") and data["mediaType"] != media_type:
        raise IntegrityError(f"{where}: Content-Type {media_type!r} disagrees with mediaType {data['mediaType']!r}")
    if declared in mt.INDEX_TYPES or (not declared and "manifests" in data):
        entries = data.get("manifests")
        if not isinstance(entries, list) or len(entries) > MAX_LAYERS:
            raise IntegrityError(f"{where}: index has no valid 'manifests' list")
        return Index(declared or mt.OCI_INDEX, digest,
                     tuple(Descriptor.from_json(e, f"{where} manifests[{i}]") for i, e in enumerate(entries)))
    if declared in mt.MANIFEST_TYPES or (not declared and "layers" in data):
        layers = data.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise IntegrityError(f"{where}: manifest has no valid 'layers' list")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise IntegrityError(f"{where}: annotations must be an object")
        config = Descriptor.from_json(data.get("config"), f"{where} config")
        return Manifest(declared or mt.OCI_MANIFEST, digest, config,
                        tuple(Descriptor.from_json(e, f"{where} layers[{i}]") for i, e in enumerate(layers)),
                        str(data.get("artifactType") or ""), {str(k): str(v) for k, v in annotations.items()}, raw)
    raise UnsupportedArtifact(f"{where}: media type {declared!r} is neither a manifest nor an index")


def host_platform() -> tuple[str, str]:
    """``(os, architecture)`` of this machine in OCI terms."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return "linux", arch


def select_from_index(index: Index, where: str) -> Descriptor:
    """Pick the entry for this node's platform, or the only manifest entry."""
    candidates = [d for d in index.manifests if d.media_type in mt.MANIFEST_TYPES + mt.INDEX_TYPES]
    if len(candidates) == 1:
        return candidates[0]
    os_name, arch = host_platform()
    for descriptor in candidates:
        if descriptor.platform.get("os") == os_name and descriptor.platform.get("architecture") == arch:
            return descriptor
    platforms = sorted({f"{d.platform.get('os', '?')}/{d.platform.get('architecture', '?')}" for d in candidates})
    have = ", ".join(platforms) or "none"
    raise UnsupportedArtifact(f"{where}: index has no entry for {os_name}/{arch} (it has {have})")
