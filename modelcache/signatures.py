"""Signature policy: which models must be signed by which keys, checked before anything is mounted.

Formats verified: Sigstore bundles (v0.3, DSSE envelope) stored as referrers of the model; OpenSSF model
signatures (bundles over the files, in the model as ``model.sig`` or as referrers: checked on the pulled
tree, see :class:`FileSignature`); and (also written by ``ocimodel sign``) cosign's key-based tag scheme.
The cosign signatures of a manifest ``sha256:<hex>`` are the layers of the manifest tagged
``sha256-<hex>.sig`` in the same repository: each layer
(``application/vnd.dev.cosign.simplesigning.v1+json``) is a payload
``{"critical": {"identity": {"docker-reference": <repository>}, "image": {"docker-manifest-digest":
<digest>}, "type": "cosign container image signature"}, "optional": ...}`` and carries the base64
signature of those payload bytes in the annotation ``dev.cosignproject.cosign/signature``. Keys: ECDSA
P-256/P-384, Ed25519 and RSA, as PEM public keys (or X.509 certificates, whose key is used).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from modelcache import mediatypes as mt
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.fsutil import atomic_write_json, read_json
from modelcache.layout import plan_for
from modelcache.manifest import Descriptor, Manifest
from modelcache.reference import Reference
from modelcache.registry import RegistryClient

log = logging.getLogger(__name__)

SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIGNATURE_TYPE = "cosign container image signature"
MAX_PAYLOAD = 1 << 20
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class SignatureRefused(ModelCacheError):
    """The policy requires a signature this model does not have."""

    kind = Kind.REFUSED


@dataclass(frozen=True)
class TrustedKey:
    """A public key a policy accepts, with the name it is known by in messages (its file name)."""

    name: str
    key: PublicKey
    path: Path
    certificate: bool = False


def load_public_key(path: Path) -> TrustedKey:
    """A PEM public key, or the key of a PEM X.509 certificate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelCacheError(f"signature key {path}: {exc.strerror}", kind=Kind.INVALID_ARGUMENT) from None
    try:
        if b"BEGIN CERTIFICATE" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ModelCacheError(f"signature key {path}: not a PEM public key or certificate ({exc})",
                              kind=Kind.INVALID_ARGUMENT) from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise ModelCacheError(f"signature key {path}: unsupported key type", kind=Kind.INVALID_ARGUMENT)
    return TrustedKey(path.name, key, path, b"BEGIN CERTIFICATE" in data)


def _verifies(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            algorithms = [hashes.SHA256()] + ([hashes.SHA384()] if key.curve.key_size >= 384 else [])
            for algorithm in algorithms:
                try:
                    key.verify(signature, payload, ec.ECDSA(algorithm))
                    return True
                except InvalidSignature:
                    continue
            return False
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True)
class Rule:
    """Models whose ``registry/repository`` matches one of ``match`` need a signature by one of ``keys``
    (``requirement`` ``keys``), or nothing (``none``)."""

    name: str
    match: tuple[str, ...]
    requirement: str = "none"
    keys: tuple[TrustedKey, ...] = ()

    def applies_to(self, ref: Reference) -> bool:
        """True when ``ref``'s repository matches one of the patterns."""
        name = f"{ref.registry}/{ref.repository}"
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.match)


@dataclass
class SignaturePolicy:
    """Ordered rules (the first that matches decides; none matching: no requirement) and the verdicts
    already reached, per manifest digest, so a verified cached model is not checked again."""

    rules: tuple[Rule, ...] = ()
    fingerprint: str = ""
    _verdicts: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _directory: Path | None = field(default=None, repr=False)

    @classmethod
    def from_mapping(cls, data: Sequence[Mapping[str, Any]] | None, source: str, base: Path | None = None
                     ) -> SignaturePolicy:
        """Parse the ``signaturePolicy`` list of the node settings (key paths relative to ``base``)."""
        rules = []
        for i, entry in enumerate(data or ()):
            where = f"{source}: signaturePolicy[{i}]"
            if not isinstance(entry, Mapping):
                raise ModelCacheError(f"{where} is not an object", kind=Kind.INVALID_ARGUMENT)
            unknown = sorted(set(entry) - {"name", "match", "require", "keys", "certificates"})
            if unknown:
                raise ModelCacheError(f"{where}: unknown keys {unknown}", kind=Kind.INVALID_ARGUMENT)
            match = entry.get("match") or []
            if isinstance(match, str):
                match = [match]
            requirement = str(entry.get("require", "keys" if entry.get("keys") or entry.get("certificates")
                                        else "none"))
            if requirement == "keyless":
                raise ModelCacheError(f"{where}: keyless (Fulcio/Rekor) identities are not supported yet; "
                                      f"name keys or certificates", kind=Kind.INVALID_ARGUMENT)
            if requirement not in ("none", "keys"):
                raise ModelCacheError(f"{where}: require must be none or keys", kind=Kind.INVALID_ARGUMENT)
            paths = [Path(str(p)) for p in [*(entry.get("keys") or []), *(entry.get("certificates") or [])]]
            keys = tuple(load_public_key(p if p.is_absolute() or base is None else base / p) for p in paths)
            if requirement == "keys" and not keys:
                raise ModelCacheError(f"{where}: require: keys needs at least one key or certificate",
                                      kind=Kind.INVALID_ARGUMENT)
            if not match:
                raise ModelCacheError(f"{where}: match needs at least one pattern", kind=Kind.INVALID_ARGUMENT)
            rules.append(Rule(str(entry.get("name") or f"rule-{i}"), tuple(str(m) for m in match), requirement,
                              keys))
        digest = hashlib.sha256(json.dumps([[r.name, r.match, r.requirement, [
            k.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo).hex()
            for k in r.keys]] for r in rules]).encode()).hexdigest()[:16]
        return cls(tuple(rules), digest)

    @classmethod
    def requiring(cls, keys: Sequence[Path]) -> SignaturePolicy:
        """Every model must be signed by one of ``keys`` (``--verify-key``)."""
        return cls.from_mapping([{"name": "--verify-key", "match": ["*"], "require": "keys",
                                  "keys": [str(k) for k in keys]}], "command line")

    def rule_for(self, ref: Reference) -> Rule | None:
        """The rule that decides for ``ref``, or None."""
        return next((r for r in self.rules if r.applies_to(ref)), None)

    def requires_signature(self, ref: Reference) -> bool:
        """True when ``ref`` must be verified before use."""
        rule = self.rule_for(ref)
        return rule is not None and rule.requirement == "keys"

    def persist_in(self, directory: Path) -> None:
        """Keep verdicts as files under ``directory`` too (the cache root's ``verdicts/``, private to root),
        so a verified cached model is used after a restart without asking the registry again."""
        self._directory = directory

    def _verdict_file(self, ref: Reference) -> Path | None:
        if self._directory is None or ref.digest is None:
            return None
        return self._directory / f"{ref.digest.algorithm}-{ref.digest.hex}-{self.fingerprint}"

    def already_verified(self, ref: Reference) -> bool:
        """True when ``ref`` (pinned) needs nothing, or was verified under this policy already."""
        if not self.requires_signature(ref):
            return True
        key = (str(ref.digest), self.fingerprint)
        with self._lock:
            if key in self._verdicts:
                return True
        path = self._verdict_file(ref)
        saved = read_json(path) if path is not None else None
        signer = str(saved.get("signer", "")) if isinstance(saved, dict) else ""
        if signer:
            with self._lock:
                self._verdicts[key] = signer
        return bool(signer)

    def check(self, client: RegistryClient, ref: Reference) -> FileSignature | None:
        """Verify digest-pinned ``ref`` against the policy; raise :class:`SignatureRefused` with the reason,
        or the registry's error (UNAVAILABLE for an unreachable signature store, never a pass). When the
        only signature is an OpenSSF model signature (over the files, in the model as ``model.sig`` or as a
        referrer), return it: the caller verifies the files with it before any of them is used."""
        rule = self.rule_for(ref)
        if rule is None or rule.requirement == "none" or self.already_verified(ref):
            return None
        assert ref.digest is not None
        bundles = _bundles(client, ref)
        found = verify_cosign(client, ref, rule.keys) or verify_bundles(bundles, ref, rule.keys)
        if found is not None:
            self.record(ref, found)
            log.info("%s: signed by %s (policy %s)", ref, found, rule.name)
            return None
        model_bundles = [raw for raw, bundle in bundles if _predicate_type(bundle) == OMS_PREDICATE]
        if model_bundles or _ships_model_sig(client.resolve(ref).manifest):
            return FileSignature(self, rule, ref, tuple(model_bundles))
        names = ", ".join(k.name for k in rule.keys)
        raise SignatureRefused(f"signature required by policy {rule.name!r}: no signature by key {names} for "
                               f"{ref.digest} ({ref.registry}/{ref.repository})")

    def record(self, ref: Reference, signer: str) -> None:
        """Remember that ``ref`` (pinned) verified under this policy, signed by ``signer``."""
        with self._lock:
            self._verdicts[(str(ref.digest), self.fingerprint)] = signer
        path = self._verdict_file(ref)
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_json(path, {"signer": signer, "reference": str(ref), "policy": self.fingerprint})


@dataclass(frozen=True)
class FileSignature:
    """OpenSSF model signatures (Sigstore bundles over the model's files) that must verify on the files of
    ``ref`` once they are on disk, before any is used: ``bundles`` from referrers, else the model's own
    ``model.sig``."""

    policy: SignaturePolicy
    rule: Rule
    ref: Reference
    bundles: tuple[bytes, ...]

    def verify_tree(self, tree: Path) -> str:
        """Check the files under ``tree`` (all of them, ``model.sig`` aside) against a signature by one of the
        rule's keys or certificates; return the signer's name, or raise :class:`SignatureRefused`."""
        import model_signing  # heavy (Sigstore); loaded only when a policy needs it

        candidates: list[Path] = []
        with tempfile.TemporaryDirectory(prefix="ocimodel-oms-") as work:
            for i, raw in enumerate(self.bundles):
                path = Path(work) / f"referrer-{i}.sig"
                path.write_bytes(raw)
                candidates.append(path)
            own = tree / OMS_FILE
            if own.is_file() and not own.is_symlink():
                candidates.append(own)
            errors: list[str] = []
            for trusted in self.rule.keys:
                config = model_signing.verifying.Config()  # type: ignore[no-untyped-call]
                if trusted.certificate:
                    config.use_certificate_verifier(certificate_chain=[trusted.path], log_fingerprints=False)
                elif isinstance(trusted.key, ec.EllipticCurvePublicKey):
                    config.use_elliptic_key_verifier(public_key=trusted.path)
                else:
                    errors.append(f"{trusted.name}: OpenSSF model signatures use elliptic-curve keys")
                    continue
                config.set_hashing_config(model_signing.hashing.Config().set_ignored_paths(  # type: ignore[no-untyped-call]
                    paths=[OMS_FILE], ignore_git_paths=False))
                for candidate in candidates:
                    try:
                        config.verify(tree, candidate)
                    except Exception as exc:  # noqa: BLE001 - the library raises ValueError and others
                        errors.append(f"{trusted.name}: {str(exc)[:200]}")
                        continue
                    self.policy.record(self.ref, trusted.name)
                    log.info("%s: files signed by %s (OpenSSF model signature, policy %s)", self.ref, trusted.name,
                             self.rule.name)
                    return trusted.name
        raise SignatureRefused(f"signature required by policy {self.rule.name!r}: the OpenSSF model signature of "
                               f"{self.ref.digest} does not verify ({'; '.join(errors) or 'no signature found'})")


def _ships_model_sig(manifest: Manifest) -> bool:
    """True when the model has a ``model.sig`` file of its own at its root (a file layer, not in a tar)."""
    try:
        return any(step.dest == OMS_FILE for step in plan_for(manifest, None).steps)
    except ModelCacheError:
        return False


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
            if _verifies(trusted.key, signature, payload):
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
    repository = f"{ref.registry}/{ref.repository}"
    return bool(digest == str(ref.digest) and kind == SIGNATURE_TYPE and _repository_of(str(identity)) == repository)


def _repository_of(name: str) -> str:
    """``registry/repository`` of a reference written with or without a tag or digest (a registry port's
    colon is not a tag)."""
    name = name.split("@", 1)[0]
    head, _, tail = name.rpartition(":")
    return head if head and "/" not in tail else name


def load_private_key(path: Path, password: bytes | None = None) -> PrivateKey:
    """A PEM private key (PKCS#8 or traditional; encrypted when ``password`` is given)."""
    try:
        key: Any = serialization.load_pem_private_key(path.read_bytes(), password)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelCacheError(f"signing key {path}: {exc}", kind=Kind.INVALID_ARGUMENT) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ModelCacheError(f"signing key {path}: unsupported key type", kind=Kind.INVALID_ARGUMENT)
    return key


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


BUNDLE_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
IN_TOTO = "application/vnd.in-toto+json"
MAX_BUNDLE = 1 << 20
OMS_PREDICATE = "https://model_signing/signature/v1.0"
OMS_FILE = "model.sig"  # where the OpenSSF model-signing tools put the signature, at the model's root


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature signs."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _statement_names(statement: bytes, ref: Reference) -> bool:
    """True when an in-toto statement's subjects include ``ref``'s digest (and, when named, repository)."""
    assert ref.digest is not None
    try:
        subjects = json.loads(statement)["subject"]
        matches = [s for s in subjects if s.get("digest", {}).get(ref.digest.algorithm) == ref.digest.hex]
    except (ValueError, KeyError, TypeError, AttributeError):
        return False
    repository = f"{ref.registry}/{ref.repository}"
    return any(not s.get("name") or _repository_of(str(s["name"])) == repository for s in matches)


def _bundles(client: RegistryClient, ref: Reference) -> list[tuple[bytes, dict[str, Any]]]:
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


def _predicate_type(bundle: dict[str, Any]) -> str:
    opened = _envelope(bundle)
    try:
        return str(json.loads(opened[1])["predicateType"]) if opened else ""
    except (ValueError, KeyError, TypeError):
        return ""


def verify_bundles(bundles: Sequence[tuple[bytes, dict[str, Any]]], ref: Reference, keys: Sequence[TrustedKey]
                   ) -> str | None:
    """The name of the key that signed one of ``bundles`` (v0.3, DSSE envelope with an in-toto statement
    whose subject is ``ref``'s digest), or None. Key-based: the transparency-log entries a bundle may carry
    are not consulted."""
    for _, bundle in bundles:
        opened = _envelope(bundle)
        if opened is None:
            log.warning("%s: a referrer holds a bundle this verifier cannot read", ref)
            continue
        payload_type, payload, signatures = opened
        if payload_type != IN_TOTO or not _statement_names(payload, ref):
            continue
        for trusted in keys:
            if any(_verifies(trusted.key, signature, _pae(payload_type, payload)) for signature in signatures):
                return trusted.name
    return None
