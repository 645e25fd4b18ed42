"""Building fixtures in a real registry: blobs, hand-made manifests, tar layers (benign and hostile)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import zstandard

from modelcache.digest import Digest
from modelcache.registry import mediatypes as mt
from modelcache.registry.client import RegistryClient
from modelcache.registry.reference import parse_reference


@dataclass
class Entry:
    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    linkname: str = ""
    size: int | None = None


def make_tar(entries: Iterable[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = entry.type
            info.mode = entry.mode
            info.linkname = entry.linkname
            info.size = len(entry.data) if entry.type == tarfile.REGTYPE else 0
            archive.addfile(info, io.BytesIO(entry.data) if entry.type == tarfile.REGTYPE else None)
    return buffer.getvalue()


def compress(data: bytes, compression: mt.Compression) -> bytes:
    if compression is mt.Compression.TAR_GZIP:
        return gzip.compress(data, mtime=0)
    if compression is mt.Compression.TAR_ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    return data


KIT_STYLES = ("current", "kit-1.9", "kit-0.4")  # what kit wrote: annotations and artifactType; digests; neither


@dataclass
class KitPart:
    """One Kitfile entry and its files (paths relative to the Kitfile's directory, under ``path``)."""

    base: str  # model, modelpart, code, dataset, docs
    path: str
    files: dict[str, bytes]
    compression: mt.Compression = mt.Compression.TAR
    fields: dict[str, Any] = field(default_factory=dict)
    extra: list[Entry] = field(default_factory=list)  # more tar entries, as given (hostile ones)


def kit_tar(part: KitPart, style: str) -> bytes:
    """A ModelKit tar layer as kit packs it: entries named relative to the Kitfile's directory, parent
    directories included; before kit v0.5, relative to the parent of the entry's path."""
    parent = posixpath.dirname(part.path.rstrip("/")) if style == "kit-0.4" else ""
    entries, dirs = [], set()
    for name in sorted(part.files):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory not in dirs:
                dirs.add(directory)
                entries.append(Entry(directory, type=tarfile.DIRTYPE, mode=0o755))
        entries.append(Entry(name, part.files[name]))
    if parent:
        entries = [Entry(e.name[len(parent) + 1:], e.data, e.type, e.mode) for e in entries
                   if e.name.startswith(parent + "/")]
    return make_tar(entries + part.extra)


def kit_layer_blob(part: KitPart, style: str) -> tuple[bytes, str]:
    """The layer's bytes and its diffId (the digest of the uncompressed tar, or of the raw file)."""
    if part.compression is mt.Compression.RAW:
        (data,) = part.files.values()
        return data, "sha256:" + hashlib.sha256(data).hexdigest()
    tar = kit_tar(part, style)
    return compress(tar, part.compression), "sha256:" + hashlib.sha256(tar).hexdigest()


def kitfile_of(parts: list[KitPart], package: dict[str, Any]) -> dict[str, Any]:
    """The Kitfile (as kit's config JSON, without layer info) for ``parts``, fields in kit's order."""
    kitfile: dict[str, Any] = {"manifestVersion": "1.0.0", "package": package}
    for part in parts:
        entry = {**({"name": part.fields["name"]} if "name" in part.fields else {}), "path": part.path,
                 **{k: v for k, v in part.fields.items() if k != "name"}}
        if part.base == "model":
            kitfile["model"] = entry
        elif part.base == "modelpart":
            kitfile.setdefault("model", {}).setdefault("parts", []).append(entry)
        else:
            kitfile.setdefault({"dataset": "datasets"}.get(part.base, part.base), []).append(entry)
    return kitfile


class Fixtures:
    """Pushes content to one registry host through the real client."""

    def __init__(self, client: RegistryClient, host: str) -> None:
        self.client = client
        self.host = host

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    def blob(self, name: str, data: bytes) -> dict[str, Any]:
        digest = Digest.of_bytes(data)
        self.client.upload_blob(parse_reference(self.ref(name)), digest, len(data), data)
        return {"digest": str(digest), "size": len(data)}

    def manifest(self, name: str, layers: list[dict[str, Any]], *, config: bytes = b"{}",
                 config_type: str = mt.MODEL_CONFIG, artifact_type: str | None = mt.MODEL_ARTIFACT,
                 media_type: str = mt.OCI_MANIFEST) -> str:
        """Push a manifest for ``name`` (repo:tag) and return its digest."""
        config_desc = {"mediaType": config_type, **self.blob(name, config)}
        manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type, "config": config_desc,
                                    "layers": layers}
        if artifact_type:
            manifest["artifactType"] = artifact_type
        raw = json.dumps(manifest).encode()
        return str(self.client.put_manifest(parse_reference(self.ref(name)), raw, media_type))

    def layer(self, name: str, data: bytes, media_type: str, annotations: dict[str, str] | None = None,
              size: int | None = None) -> dict[str, Any]:
        desc = {"mediaType": media_type, **self.blob(name, data)}
        if size is not None:
            desc["size"] = size
        if annotations:
            desc["annotations"] = annotations
        return desc

    def raw_model(self, name: str, files: dict[str, bytes]) -> str:
        layers = [self.layer(name, data, mt.model_layer_type("weight", mt.Compression.RAW),
                             {mt.ANNOTATION_FILEPATH: path}) for path, data in files.items()]
        return self.manifest(name, layers)

    def tar_model(self, name: str, entries: list[Entry], compression: mt.Compression, kind: str = "weight") -> str:
        data = compress(make_tar(entries), compression)
        return self.manifest(name, [self.layer(name, data, mt.model_layer_type(kind, compression))])

    def image(self, name: str, layers: list[bytes], compression: mt.Compression = mt.Compression.TAR_GZIP,
              media_type: str = mt.OCI_MANIFEST) -> str:
        layer_type = {mt.Compression.TAR: "application/vnd.oci.image.layer.v1.tar",
                      mt.Compression.TAR_GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
                      mt.Compression.TAR_ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd"}[compression]
        config_type = mt.OCI_IMAGE_CONFIG
        if media_type == mt.DOCKER_MANIFEST:
            layer_type = "application/vnd.docker.image.rootfs.diff.tar.gzip"
            config_type = mt.DOCKER_IMAGE_CONFIG
        descs = [self.layer(name, compress(data, compression), layer_type) for data in layers]
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        return self.manifest(name, descs, config=config, config_type=config_type, artifact_type=None,
                             media_type=media_type)

    def index(self, name: str, entries: list[tuple[str, dict[str, str]]]) -> str:
        """Push an index whose entries are (manifest digest, platform) of manifests already pushed."""
        ref = parse_reference(self.ref(name))
        manifests = []
        for digest, platform in entries:
            response = self.client.transport.session.get(
                f"http://{self.host}/v2/{ref.repository}/manifests/{digest}",
                headers={"Accept": mt.ACCEPT_MANIFESTS})
            manifests.append({"mediaType": response.headers["Content-Type"], "digest": digest,
                              "size": len(response.content), "platform": platform})
        raw = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests}).encode()
        return str(self.client.put_manifest(ref, raw, mt.OCI_INDEX))

    def modelkit(self, name: str, parts: list[KitPart], style: str = "current", *,
                 package: dict[str, Any] | None = None,
                 tamper: Callable[[dict[str, Any]], None] | None = None) -> tuple[str, dict[str, Any]]:
        """Push a ModelKit the way kit ``style`` packs it (layers in kit's order: model, parts, code,
        datasets, docs); ``tamper`` may change the config JSON first. Returns (digest, Kitfile without
        layer info)."""
        order = ("model", "modelpart", "code", "dataset", "docs")
        parts = sorted(parts, key=lambda p: order.index(p.base))
        plain = kitfile_of(parts, package or {"name": name.split(":")[0], "authors": ["tests"]})
        config = json.loads(json.dumps(plain))
        entries = ([config["model"]] if any(p.base == "model" for p in parts) else []) + \
            config.get("model", {}).get("parts", []) + config.get("code", []) + config.get("datasets", []) + \
            config.get("docs", [])
        layers = []
        for part, entry in zip(parts, entries, strict=True):
            data, diff_id = kit_layer_blob(part, style)
            annotations = {mt.ANNOTATION_FILEPATH: part.path} if style == "current" else None
            layer = self.layer(name, data, mt.kit_layer_type(part.base, part.compression), annotations)
            if style != "kit-0.4":
                entry.update(digest=layer["digest"], diffId=diff_id)
            layers.append(layer)
        if tamper is not None:
            tamper(config)
        digest = self.manifest(name, layers, config=json.dumps(config).encode(), config_type=mt.KIT_CONFIG,
                               artifact_type=mt.KIT_ARTIFACT if style == "current" else None)
        return digest, plain
