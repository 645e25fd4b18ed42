"""What a reference holds, read from its manifest, its config (only when the layout lives there: a ModelKit's
Kitfile) and small signature manifests, without fetching a layer: ``ocimodel inspect``."""

from __future__ import annotations

from typing import Any

from modelcache.assemble.layout import needs_config, plan_for
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry import mediatypes as mt
from modelcache.registry.client import RegistryClient
from modelcache.registry.manifest import Descriptor, Manifest
from modelcache.registry.reference import Reference
from modelcache.trust import chunkindex
from modelcache.trust.bundles import BUNDLE_TYPE
from modelcache.trust.cosign import SIMPLESIGNING, signature_tag


def describe(client: RegistryClient, ref: Reference) -> dict[str, Any]:
    """Media types, layout, each layer (kind, format, where it goes, size), signatures and chunk index."""
    resolved = client.resolve(ref)
    manifest = resolved.manifest
    pinned = ref.with_digest(resolved.digest)
    layout, error, places = "", "", [""] * len(manifest.layers)
    try:
        config = client.get_small_blob(ref, manifest.config) if needs_config(manifest) else None
        plan = plan_for(manifest, None, config=config)
        layout = plan.layout
        own = [s for s in plan.steps if s.descriptor.digest not in plan.synthesized]
        places = [(f"{s.dest}/" if s.dest else "/") if s.compression.is_tar else s.dest for s in own]
    except ModelCacheError as exc:
        if exc.kind not in (Kind.UNSUPPORTED, Kind.INTEGRITY, Kind.UNSAFE_CONTENT):
            raise
        error = str(exc)
    return {
        "reference": str(ref), "digest": str(resolved.digest), "manifest_digest": str(manifest.digest),
        "media_type": manifest.media_type, "artifact_type": manifest.artifact_type,
        "config_media_type": manifest.config.media_type, "layout": layout or "unsupported", "problem": error,
        "total_bytes": sum(d.size for d in manifest.layers),
        "layers": [_layer(d, place) for d, place in zip(manifest.layers, places, strict=True)],
        "signatures": _signatures(client, pinned), "chunk_index": _chunk_index(manifest),
    }


def _layer(descriptor: Descriptor, place: str) -> dict[str, Any]:
    kit = mt.kit_layer(descriptor.media_type)
    model = mt.model_layer(descriptor.media_type)
    compression = kit[1] if kit else model[1] if model else mt.image_layer(descriptor.media_type)
    return {"media_type": descriptor.media_type, "digest": str(descriptor.digest), "size": descriptor.size,
            "kind": mt.model_kind(descriptor.media_type) or "", "format": compression.value if compression else "",
            "path": place}


def _signatures(client: RegistryClient, ref: Reference) -> dict[str, Any]:
    """How many cosign signatures (tag scheme) and Sigstore bundles (referrers) name ``ref``'s digest;
    not verified (``ocimodel pull --verify-key`` does that)."""
    assert ref.digest is not None
    result: dict[str, Any] = {}
    try:
        layers = client.resolve(signature_tag(ref, ref.digest)).manifest.layers
        result["cosign"] = sum(1 for d in layers if d.media_type == SIMPLESIGNING)
    except ModelCacheError as exc:
        if exc.kind is not Kind.NOT_FOUND:
            raise
        result["cosign"] = 0
    result["sigstore_bundles"] = len(client.referrers(ref, BUNDLE_TYPE))
    return result


def _chunk_index(manifest: Manifest) -> dict[str, Any] | None:
    """The chunk index the manifest names (lazy mounts verify each chunk with it), or None."""
    digest = manifest.annotations.get(chunkindex.ANNOTATION_DIGEST)
    if not digest:
        return None
    return {"digest": digest, "size": manifest.annotations.get(chunkindex.ANNOTATION_SIZE, "")}
