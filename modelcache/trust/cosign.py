"""cosign's key-based tag scheme (written by ``cosign sign --key``, ``ocimodel sign`` and ``ocimodel push
--sign-key``). The cosign signatures of a manifest ``sha256:<hex>`` are the layers of the manifest tagged
``sha256-<hex>.sig`` in the same repository: each layer (``application/vnd.dev.cosign.simplesigning.v1+json``)
is a payload ``{"critical": {"identity": {"docker-reference": <repository>}, "image":
{"docker-manifest-digest": <digest>}, "type": "cosign container image signature"}, "optional": ...}`` and
carries the base64 signature of those payload bytes in the annotation ``dev.cosignproject.cosign/signature``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry import mediatypes as mt
from modelcache.registry.client import RegistryClient
from modelcache.registry.manifest import Descriptor
from modelcache.registry.reference import Reference
from modelcache.trust.sigkeys import PrivateKey, TrustedKey, names_repository, verifies

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
MAX_PAYLOAD = 1 << 20


def signature_tag(ref: Reference, digest: Digest) -> Reference:
    """Where cosign's tag scheme keeps the signatures of ``digest``."""
    return ref.with_tag(f"{digest.algorithm}-{digest.hex}.sig")


def verify_cosign(client: RegistryClient, ref: Reference, keys: Sequence[TrustedKey]) -> str | None:
    """The name of the key whose cosign signature covers ``ref``'s digest and repository, or None."""
    assert ref.digest is not None
    layers = _signature_layers(client, ref)
    for layer in layers:
        encoded = layer.annotations.get(SIGNATURE_ANNOTATION, "")
        try:
            signature = base64.b64decode(encoded, validate=True)
        except ValueError:
            continue
        payload = client.get_small_blob(signature_tag(ref, ref.digest), layer, limit=MAX_PAYLOAD)
        if not _payload_names(payload, ref):
            continue
        for trusted in keys:
            if verifies(trusted.key, signature, payload):
                return trusted.name
    return None


def _signature_layers(client: RegistryClient, ref: Reference) -> list[Descriptor]:
    assert ref.digest is not None
    try:
        resolved = client.resolve(signature_tag(ref, ref.digest))
    except ModelCacheError as exc:
        if exc.kind is Kind.NOT_FOUND:
            return []
        raise
    return [d for d in resolved.manifest.layers if d.media_type == SIMPLESIGNING]


def _payload_names(payload: bytes, ref: Reference) -> bool:
    """True when a simple-signing payload names exactly ``ref``'s digest and repository."""
    try:
        critical = json.loads(payload)["critical"]
        digest = critical["image"]["docker-manifest-digest"]
        identity = critical["identity"]["docker-reference"]
        kind = critical["type"]
    except (ValueError, KeyError, TypeError):
        return False
    return digest == str(ref.digest) and kind == SIGNATURE_TYPE and names_repository(identity, ref)


def sign_cosign(client: RegistryClient, ref: Reference, key: PrivateKey) -> Digest:
    """Sign digest-pinned ``ref`` in cosign's tag scheme (adding to the signatures already there); return
    the digest of the signature manifest."""
    assert ref.digest is not None
    payload = json.dumps({"critical": {"identity": {"docker-reference": f"{ref.registry}/{ref.repository}"},
                                       "image": {"docker-manifest-digest": str(ref.digest)},
                                       "type": SIGNATURE_TYPE}, "optional": None}, separators=(",", ":")).encode()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(payload)
    elif isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    else:
        signature = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    tag = signature_tag(ref, ref.digest)
    payload_digest = Digest.of_bytes(payload)
    client.upload_blob(tag, payload_digest, len(payload), payload)
    ours = {"mediaType": SIMPLESIGNING, "digest": str(payload_digest), "size": len(payload),
            "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()}}
    # every signer's layer names the same payload; they differ by their signature annotation
    layers = [{"mediaType": d.media_type, "digest": str(d.digest), "size": d.size, "annotations": d.annotations}
              for d in _signature_layers(client, ref)]
    layers = [layer for layer in layers if layer != ours] + [ours]
    config = json.dumps({"architecture": "", "os": "", "config": {}, "rootfs": {
        "type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}, sort_keys=True).encode()
    client.upload_blob(tag, Digest.of_bytes(config), len(config), config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "config": {
        "mediaType": mt.OCI_IMAGE_CONFIG, "digest": str(Digest.of_bytes(config)), "size": len(config)},
        "layers": layers}, sort_keys=True).encode()
    return client.put_manifest(tag, manifest, mt.OCI_MANIFEST)
