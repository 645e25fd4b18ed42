"""Chunk indexes: the sha256 of every fixed-size chunk of a model's raw layers, so a lazy read can verify
each chunk before serving it (an OCI digest covers a whole blob, which a lazy read does not have yet).

The index is a blob (``application/vnd.ocimodel.chunk-index.v1+json``) whose digest and size are
annotations of the model's manifest, so the manifest digest covers it and it cannot be swapped. A
referrer manifest (``subject``: the model) holds it as its layer, so registries keep it; it is found
through the referrers API or, on registries without one, the referrers tag schema (``sha256-<hex>``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcache.digest import Digest
from modelcache.errors import IntegrityError, ModelCacheError
from modelcache.registry import mediatypes as mt
from modelcache.registry.client import READ_SIZE, RegistryClient
from modelcache.registry.manifest import Descriptor, Manifest
from modelcache.registry.reference import Reference

log = logging.getLogger(__name__)

INDEX_TYPE = "application/vnd.ocimodel.chunk-index.v1+json"
ANNOTATION_DIGEST = "dev.ocimodel.chunk-index.digest"
ANNOTATION_SIZE = "dev.ocimodel.chunk-index.size"
DEFAULT_CHUNK_SIZE = 4 << 20
MAX_INDEX_BYTES = 64 << 20  # 64 hex digits per 4 MiB chunk: enough for a 3 TiB model
EMPTY_CONFIG = b"{}"


@dataclass(frozen=True)
class ChunkIndex:
    """Per blob: its size and the sha256 (hex) of each ``chunk_size`` chunk (the last one may be short)."""

    chunk_size: int
    blobs: dict[str, tuple[int, tuple[str, ...]]]

    def expected(self, digest: Digest | str, chunk: int) -> str | None:
        """The sha256 of chunk number ``chunk`` of blob ``digest``, or None when the index does not cover it."""
        entry = self.blobs.get(str(digest))
        return entry[1][chunk] if entry and 0 <= chunk < len(entry[1]) else None

    def covers(self, digest: Digest | str) -> bool:
        """True when every chunk of ``digest`` has a hash."""
        return str(digest) in self.blobs

    def to_json(self) -> bytes:
        """The index blob."""
        return json.dumps({"schemaVersion": 1, "mediaType": INDEX_TYPE, "algorithm": "sha256",
                           "chunkSize": self.chunk_size,
                           "blobs": {d: {"size": size, "chunks": list(chunks)} for d, (size, chunks) in
                                     sorted(self.blobs.items())}}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, layers: Sequence[Descriptor], what: str) -> ChunkIndex:
        """Parse and check an index against the manifest's layers (sizes, chunk counts, hex digests)."""
        try:
            data: Any = json.loads(raw)
            chunk_size = int(data["chunkSize"])
            blobs = data["blobs"]
            if data.get("algorithm") != "sha256" or chunk_size <= 0 or not isinstance(blobs, dict):
                raise ValueError("unsupported algorithm or chunk size")
        except (ValueError, KeyError, TypeError) as exc:
            raise IntegrityError(f"{what}: not a chunk index: {exc}") from None
        sizes = {str(layer.digest): layer.size for layer in layers}
        parsed: dict[str, tuple[int, tuple[str, ...]]] = {}
        for digest, entry in blobs.items():
            chunks = tuple(str(c) for c in entry.get("chunks", [])) if isinstance(entry, dict) else ()
            size = sizes.get(digest)
            if size is None or not isinstance(entry, dict) or entry.get("size") != size or \
                    len(chunks) != max(1, -(-size // chunk_size)) or \
                    not all(len(c) == 64 and all(x in "0123456789abcdef" for x in c) for c in chunks):
                raise IntegrityError(f"{what}: the entry for {digest} does not match the manifest's layer")
            parsed[digest] = (size, chunks)
        return cls(chunk_size, parsed)


def hash_file(path: Path, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[str, int, tuple[str, ...]]:
    """One pass over a file: its digest, size and the sha256 of each ``chunk_size`` chunk."""
    whole = hashlib.sha256()
    chunks: list[str] = []
    part = hashlib.sha256()
    in_part = size = 0
    buffer = bytearray(READ_SIZE)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            data = view[:n]
            whole.update(data)
            size += n
            while data:
                take = min(len(data), chunk_size - in_part)
                part.update(data[:take])
                in_part += take
                data = data[take:]
                if in_part == chunk_size:
                    chunks.append(part.hexdigest())
                    part, in_part = hashlib.sha256(), 0
    if in_part or not chunks:
        chunks.append(part.hexdigest())
    return f"sha256:{whole.hexdigest()}", size, tuple(chunks)


def annotations_for(index_digest: Digest, index_size: int) -> dict[str, str]:
    """The manifest annotations that bind an index to a model."""
    return {ANNOTATION_DIGEST: str(index_digest), ANNOTATION_SIZE: str(index_size)}


def load(client: RegistryClient, ref: Reference, manifest: Manifest) -> ChunkIndex | None:
    """The chunk index a model's manifest names (fetched, digest-verified, checked), or None without one."""
    if ANNOTATION_DIGEST not in manifest.annotations:
        return None
    what = f"chunk index of {ref}"
    try:
        digest = Digest.parse(manifest.annotations[ANNOTATION_DIGEST])
        size = int(manifest.annotations.get(ANNOTATION_SIZE, "0"))
    except (ModelCacheError, ValueError):
        raise IntegrityError(f"{what}: bad {ANNOTATION_DIGEST}/{ANNOTATION_SIZE} annotations") from None
    raw = client.get_small_blob(ref, Descriptor(INDEX_TYPE, digest, size), limit=MAX_INDEX_BYTES)
    return ChunkIndex.from_json(raw, manifest.layers, what)


def publish_referrer(client: RegistryClient, ref: Reference, manifest_raw: bytes, index_raw: bytes) -> Digest:
    """Push a referrer manifest whose subject is the model and whose layer is the index (so registries
    keep the index), and list it under the referrers tag schema for registries without a referrers API."""
    index_digest = Digest.of_bytes(index_raw)
    manifest_digest = Digest.of_bytes(manifest_raw)
    subject = {"mediaType": mt.OCI_MANIFEST, "digest": str(manifest_digest), "size": len(manifest_raw)}
    client.upload_blob(ref, Digest.of_bytes(EMPTY_CONFIG), len(EMPTY_CONFIG), EMPTY_CONFIG)
    referrer = json.dumps({
        "schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": INDEX_TYPE,
        "config": {"mediaType": mt.OCI_EMPTY, "digest": str(Digest.of_bytes(EMPTY_CONFIG)), "size": len(EMPTY_CONFIG)},
        "layers": [{"mediaType": INDEX_TYPE, "digest": str(index_digest), "size": len(index_raw)}],
        "subject": subject}, sort_keys=True).encode()
    referrer_digest = Digest.of_bytes(referrer)
    client.put_manifest(ref.by_digest(referrer_digest), referrer, mt.OCI_MANIFEST)
    entry = {"mediaType": mt.OCI_MANIFEST, "digest": str(referrer_digest), "size": len(referrer),
             "artifactType": INDEX_TYPE}
    tag = ref.with_tag(f"{manifest_digest.algorithm}-{manifest_digest.hex}")
    listed = client.referrers_tag_index(tag)
    if not any(m.get("digest") == entry["digest"] for m in listed):
        listed.append(entry)
    index = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": listed}, sort_keys=True).encode()
    client.put_manifest(tag, index, mt.OCI_INDEX)
    log.info("chunk index %s of %s kept by referrer %s", index_digest, manifest_digest, referrer_digest)
    return referrer_digest
