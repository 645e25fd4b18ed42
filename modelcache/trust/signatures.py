"""Signature policy: which models must be signed by which keys, checked before anything is mounted, and the
verdicts already reached.

A policy is an ordered list of rules (the first whose pattern matches ``registry/repository`` decides) and a
default for models no rule names: nothing (``none``), or refusal (``signed``). Formats verified: cosign's
key-based tag scheme (:mod:`modelcache.trust.cosign`), Sigstore bundles stored as referrers
(:mod:`modelcache.trust.bundles`) and OpenSSF model signatures over the files (:class:`FileSignature`).

A verdict is for one rule (its name, requirement and keys), one registry and repository, and one digest: a
model verified under one rule, or in one repository, is checked again when another rule or repository names
the same digest, even though its files are already cached.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from modelcache.assemble.layout import plan_for
from modelcache.errors import Kind, ModelCacheError
from modelcache.fsutil import atomic_write_json, read_json
from modelcache.registry.client import RegistryClient
from modelcache.registry.manifest import Manifest
from modelcache.registry.reference import DOCKER_HUB, Reference, normalise_registry
from modelcache.trust.bundles import OMS_FILE, OMS_PREDICATE, find_bundles, predicate_type, verify_bundles
from modelcache.trust.cosign import verify_cosign
from modelcache.trust.sigkeys import TrustedKey, load_public_key

log = logging.getLogger(__name__)

DEFAULTS = ("none", "signed")  # what a policy asks of a model no rule names
GLOB = "*?["


class SignatureRefused(ModelCacheError):
    """The policy requires a signature this model does not have."""

    kind = Kind.REFUSED


def normalise_pattern(pattern: str) -> str:
    """``pattern`` (``registry/repository`` glob) with its registry spelled as references are (see
    :func:`modelcache.registry.reference.normalise_registry`) and matched literally (an IPv6 host's brackets are no
    glob class); a glob in the registry part is lower-cased. Raise ValueError for a registry that is no host."""
    host, sep, path = pattern.partition("/")
    if not sep:
        return pattern.lower()
    if any(c in host for c in "*?"):
        if "[" in host:
            raise ValueError(f"pattern {pattern!r}: a glob in the registry part cannot hold an IPv6 address")
        return pattern.lower()
    try:
        host = normalise_registry(host)
    except ValueError as exc:
        raise ValueError(f"pattern {pattern!r}: {exc}") from None
    path = path.lower()
    if host == DOCKER_HUB and "/" not in path and not any(c in path for c in GLOB):
        path = f"library/{path}"
    return f"{glob.escape(host)}/{path}"


@dataclass(frozen=True)
class Rule:
    """Models whose ``registry/repository`` matches one of ``match`` need a signature by one of ``keys``
    (``requirement`` ``keys``), or nothing (``none``). Patterns are normalised when the rule is made."""

    name: str
    match: tuple[str, ...]
    requirement: str = "none"
    keys: tuple[TrustedKey, ...] = ()
    identity: str = field(init=False, repr=False, compare=False)  # name, requirement and keys: what a verdict is for

    def __post_init__(self) -> None:
        object.__setattr__(self, "match", tuple(normalise_pattern(p) for p in self.match))
        identity = json.dumps([self.name, self.requirement, sorted(k.fingerprint() for k in self.keys)])
        object.__setattr__(self, "identity", hashlib.sha256(identity.encode()).hexdigest()[:32])

    def applies_to(self, ref: Reference) -> bool:
        """True when ``ref``'s (normalised) ``registry/repository`` matches one of the patterns."""
        name = f"{ref.registry}/{ref.repository}"
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.match)


def _rule(entry: object, where: str, base: Path | None, position: int) -> Rule:
    """One rule of the ``signaturePolicy`` list, validated."""
    if not isinstance(entry, Mapping):
        raise ModelCacheError(f"{where} is not an object", kind=Kind.INVALID_ARGUMENT)
    unknown = sorted(set(entry) - {"name", "match", "require", "keys", "certificates"})
    if unknown:
        raise ModelCacheError(f"{where}: unknown keys {unknown}", kind=Kind.INVALID_ARGUMENT)
    match = entry.get("match") or []
    if isinstance(match, str):
        match = [match]
    requirement = str(entry.get("require", "keys" if entry.get("keys") or entry.get("certificates") else "none"))
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
    if not match or not isinstance(match, list):
        raise ModelCacheError(f"{where}: match needs at least one pattern", kind=Kind.INVALID_ARGUMENT)
    try:
        return Rule(str(entry.get("name") or f"rule-{position}"), tuple(str(m) for m in match), requirement, keys)
    except ValueError as exc:
        raise ModelCacheError(f"{where}: {exc}", kind=Kind.INVALID_ARGUMENT) from None


@dataclass
class SignaturePolicy:
    """Ordered rules (the first that matches decides), what models no rule names need (``default``: ``none``
    or ``signed``, which refuses them), and the verdicts already reached, so that a model verified for a
    rule and repository is not checked again there."""

    rules: tuple[Rule, ...] = ()
    default: str = "none"
    _verdicts: dict[tuple[str, str, str, str], str] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _directory: Path | None = field(default=None, repr=False)

    @classmethod
    def from_mapping(cls, data: object, source: str, base: Path | None = None) -> SignaturePolicy:
        """Parse the node settings' ``signaturePolicy``: a list of rules, or ``{default: none|signed, rules:
        [...]}`` (key paths relative to ``base``)."""
        where, default, entries = f"{source}: signaturePolicy", "none", data
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - {"default", "rules"})
            if unknown:
                raise ModelCacheError(f"{where}: unknown keys {unknown}", kind=Kind.INVALID_ARGUMENT)
            default, entries, where = data.get("default", "none"), data.get("rules") or [], f"{where}.rules"
            if default not in DEFAULTS:
                raise ModelCacheError(f"{source}: signaturePolicy.default must be signed or none",
                                      kind=Kind.INVALID_ARGUMENT)
            if not isinstance(entries, list):
                raise ModelCacheError(f"{where} must be a list", kind=Kind.INVALID_ARGUMENT)
        elif data is None:
            entries = []
        elif not isinstance(data, list):
            raise ModelCacheError(f"{where} must be a list of rules or a mapping {{default, rules}}",
                                  kind=Kind.INVALID_ARGUMENT)
        assert isinstance(entries, list)
        return cls(tuple(_rule(entry, f"{where}[{i}]", base, i) for i, entry in enumerate(entries)), str(default))

    @classmethod
    def requiring(cls, keys: Sequence[Path]) -> SignaturePolicy:
        """Every model must be signed by one of ``keys`` (``--verify-key``)."""
        return cls.from_mapping([{"name": "--verify-key", "match": ["*"], "require": "keys",
                                  "keys": [str(k) for k in keys]}], "command line")

    def rule_for(self, ref: Reference) -> Rule | None:
        """The rule that decides for ``ref``, or None."""
        return next((r for r in self.rules if r.applies_to(ref)), None)

    def requires_signature(self, ref: Reference) -> bool:
        """True when ``ref`` must be verified (or, named by no rule under ``default: signed``, is refused)
        before use."""
        rule = self.rule_for(ref)
        return rule.requirement == "keys" if rule is not None else self.default == "signed"

    def persist_in(self, directory: Path) -> None:
        """Keep verdicts as files under ``directory`` too (the cache root's ``verdicts/``, private to root),
        so a verified cached model is used after a restart without asking the registry again."""
        self._directory = directory

    @staticmethod
    def _key(rule: Rule, ref: Reference) -> tuple[str, str, str, str]:
        return rule.identity, ref.registry, ref.repository, str(ref.digest)

    def _verdict_file(self, key: tuple[str, str, str, str]) -> Path | None:
        """``<algorithm>-<hex>-<hash of rule, registry and repository>`` (one digest's verdicts sort
        together, so deleting them by digest is a glob)."""
        if self._directory is None:
            return None
        where = hashlib.sha256("\0".join(key[:3]).encode()).hexdigest()[:40]
        return self._directory / f"{key[3].replace(':', '-')}-{where}"

    def already_verified(self, ref: Reference) -> bool:
        """True when ``ref`` needs nothing, or (pinned) was verified already under the rule that decides for
        it, in its registry and repository."""
        rule = self.rule_for(ref)
        if rule is None:
            return self.default == "none"
        if rule.requirement == "none":
            return True
        if ref.digest is None:
            return False
        key = self._key(rule, ref)
        with self._lock:
            if key in self._verdicts:
                return True
        path = self._verdict_file(key)
        saved = read_json(path) if path is not None else None
        if not isinstance(saved, dict) or [saved.get(k) for k in ("rule_identity", "registry", "repository",
                                                                    "digest")] != list(key):
            return False
        signer = str(saved.get("signer") or "")
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
        if rule is None and self.default == "signed":
            raise SignatureRefused(f"signature required by the policy's default: no rule names "
                                   f"{ref.registry}/{ref.repository} ({ref.digest or ref.selector})")
        if rule is None or rule.requirement == "none" or self.already_verified(ref):
            return None
        assert ref.digest is not None
        bundles = find_bundles(client, ref)
        found = verify_cosign(client, ref, rule.keys) or verify_bundles(bundles, ref, rule.keys)
        if found is not None:
            self.record(rule, ref, found)
            log.info("%s: signed by %s (policy %s)", ref, found, rule.name)
            return None
        model_bundles = [raw for raw, bundle in bundles if predicate_type(bundle) == OMS_PREDICATE]
        if model_bundles or _ships_model_sig(client.resolve(ref).manifest):
            return FileSignature(self, rule, ref, tuple(model_bundles))
        names = ", ".join(k.name for k in rule.keys)
        raise SignatureRefused(f"signature required by policy {rule.name!r}: no signature by key {names} for "
                               f"{ref.digest} ({ref.registry}/{ref.repository})")

    def record(self, rule: Rule, ref: Reference, signer: str) -> None:
        """Remember that ``ref`` (pinned) verified under ``rule`` in its repository, signed by ``signer``."""
        key = self._key(rule, ref)
        with self._lock:
            self._verdicts[key] = signer
        path = self._verdict_file(key)
        if path is not None:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_json(path, {"signer": signer, "rule": rule.name, "rule_identity": rule.identity,
                                     "registry": ref.registry, "repository": ref.repository,
                                     "digest": str(ref.digest), "reference": str(ref)})


_UNSIGNED_DIRS = (".git", ".github")  # what model-signing ignores by default when it signs


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

        # the library skips everything under an ignored path: nothing unsigned may hide there
        for ignored in (OMS_FILE, *_UNSIGNED_DIRS):
            path = tree / ignored
            if os.path.lexists(path) and (ignored != OMS_FILE or path.is_symlink() or not path.is_file()):
                raise SignatureRefused(f"signature required by policy {self.rule.name!r}: {self.ref.digest} has "
                                       f"{ignored!r} at its root{'' if ignored != OMS_FILE else ', not a file'}; "
                                       f"OpenSSF model signatures leave what is under that path unchecked")
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
                    self.policy.record(self.rule, self.ref, trusted.name)
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
