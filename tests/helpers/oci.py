"""Building fixtures in a real registry: blobs, hand-made manifests, tar layers (benign and hostile)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zstandard

from modelcache import mediatypes as mt
from modelcache.digest import Digest
from modelcache.reference import parse_reference
from modelcache.registry import RegistryClient


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
