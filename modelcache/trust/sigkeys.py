"""Keys for signatures (ECDSA P-256/P-384, Ed25519 and RSA, as PEM public keys or X.509 certificates, whose
key is used) and what every signature format checks the same way: whether a signed name is the model's
repository."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from modelcache.errors import InvalidReference, Kind, ModelCacheError
from modelcache.registry.reference import Reference, parse_reference

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class TrustedKey:
    """A public key a policy accepts, with the name it is known by in messages (its file name)."""

    name: str
    key: PublicKey
    path: Path
    certificate: bool = False

    def fingerprint(self) -> str:
        """The hex of the key's DER SubjectPublicKeyInfo (the same key from a certificate or a PEM key)."""
        return self.key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo).hex()


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


def load_private_key(path: Path, password: bytes | None = None) -> PrivateKey:
    """A PEM private key (PKCS#8 or traditional; encrypted when ``password`` is given)."""
    try:
        key: Any = serialization.load_pem_private_key(path.read_bytes(), password)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelCacheError(f"signing key {path}: {exc}", kind=Kind.INVALID_ARGUMENT) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ModelCacheError(f"signing key {path}: unsupported key type", kind=Kind.INVALID_ARGUMENT)
    return key


def verifies(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    """True when ``signature`` over ``payload`` verifies with ``key`` (ECDSA with SHA-256, or SHA-384 on
    curves of 384 bits and more; RSA PKCS#1 v1.5 with SHA-256; Ed25519)."""
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


def names_repository(name: object, ref: Reference) -> bool:
    """True when ``name`` (a signed payload's reference: with or without a tag, spelled any way the
    reference parser normalises) is ``ref``'s registry and repository, and carries no digest but
    ``ref``'s. A missing or empty name, or one that is no reference, names nothing."""
    if not isinstance(name, str) or not name:
        return False
    try:
        named = parse_reference(name)
    except InvalidReference:
        return False
    return (named.registry, named.repository) == (ref.registry, ref.repository) and \
        named.digest in (None, ref.digest)
