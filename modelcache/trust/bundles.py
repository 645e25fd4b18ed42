"""Sigstore bundles (v0.3, a DSSE envelope around an in-toto statement) stored as referrers of a model,
verified with keys (the transparency-log entries a bundle may carry are not consulted). OpenSSF model
signatures are such bundles too, over the files: see :class:`modelcache.trust.signatures.FileSignature`."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence
from typing import Any

from modelcache.registry.client import RegistryClient
from modelcache.registry.reference import Reference
from modelcache.trust.sigkeys import TrustedKey, names_repository, verifies

log = logging.getLogger(__name__)

BUNDLE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO = "application/vnd.in-toto+json"
MAX_BUNDLE = 1 << 20
OMS_PREDICATE = "https://model_signing/signature/v1.0"
OMS_FILE = "model.sig"  # where the OpenSSF model-signing tools put the signature, at the model's root
Bundle = tuple[bytes, dict[str, Any]]  # raw and parsed


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _statement_names(statement: bytes, ref: Reference) -> bool:
    """True when one of an in-toto statement's subjects has ``ref``'s digest and names its repository (a
    subject without a name, or naming another repository, names nothing)."""
    assert ref.digest is not None
    try:
        subjects = json.loads(statement)["subject"]
        return any(isinstance(s, dict) and isinstance(s.get("digest"), dict)
                   and s["digest"].get(ref.digest.algorithm) == ref.digest.hex
                   and names_repository(s.get("name"), ref) for s in subjects)
    except (ValueError, KeyError, TypeError):
        return False


def find_bundles(client: RegistryClient, ref: Reference) -> list[Bundle]:
    """The Sigstore bundles stored as referrers of ``ref`` (raw and parsed)."""
    found = []
    for referrer in client.referrers(ref, BUNDLE_TYPE):
        manifest = client.resolve(ref.by_digest(referrer.digest)).manifest
        for layer in manifest.layers:
            if layer.media_type != BUNDLE_TYPE:
                continue
            raw = client.get_small_blob(ref, layer, limit=MAX_BUNDLE)
            try:
                bundle = json.loads(raw)
            except ValueError:
                log.warning("%s: referrer %s holds a bundle that is not JSON", ref, referrer.digest)
                continue
            if isinstance(bundle, dict):
                found.append((raw, bundle))
    return found


def _envelope(bundle: dict[str, Any]) -> tuple[str, bytes, list[bytes]] | None:
    try:
        envelope = bundle["dsseEnvelope"]
        return (str(envelope["payloadType"]), base64.b64decode(envelope["payload"], validate=True),
                [base64.b64decode(s["sig"], validate=True) for s in envelope["signatures"]])
    except (ValueError, KeyError, TypeError):
        return None


def predicate_type(bundle: dict[str, Any]) -> str:
    """The predicate type of a bundle's in-toto statement ("" when it has none)."""
    opened = _envelope(bundle)
    try:
        return str(json.loads(opened[1])["predicateType"]) if opened else ""
    except (ValueError, KeyError, TypeError):
        return ""


def verify_bundles(bundles: Sequence[Bundle], ref: Reference, keys: Sequence[TrustedKey]) -> str | None:
    """The name of the key that signed one of ``bundles`` (v0.3, DSSE envelope with an in-toto statement
    one of whose subjects is ``ref``'s digest, named as ``ref``'s repository), or None. Key-based: the
    transparency-log entries a bundle may carry are not consulted."""
    for _, bundle in bundles:
        opened = _envelope(bundle)
        if opened is None:
            log.warning("%s: a referrer holds a bundle this verifier cannot read", ref)
            continue
        payload_type, payload, signatures = opened
        if payload_type != IN_TOTO or not _statement_names(payload, ref):
            continue
        for trusted in keys:
            if any(verifies(trusted.key, signature, _pae(payload_type, payload)) for signature in signatures):
                return trusted.name
    return None
