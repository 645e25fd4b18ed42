"""Volume attributes, capabilities and per-volume secrets, validated into what the core needs."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from csi_driver.errors import invalid
from csi_driver.proto import csi_pb2
from modelcache.assemble.options import PullOptions, parse_layer_kinds
from modelcache.errors import ModelCacheError
from modelcache.registry.credentials import Credentials, CredentialStore
from modelcache.registry.reference import Reference, parse_reference

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
SUPPORTED_MODES = frozenset({Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY,
                             Mode.SINGLE_NODE_SINGLE_WRITER})
MOUNT_TYPES = ("bind", "lazy")
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
POD_NAMESPACE_KEY, POD_NAME_KEY, POD_UID_KEY = ("csi.storage.k8s.io/pod.namespace", "csi.storage.k8s.io/pod.name",
                                               "csi.storage.k8s.io/pod.uid")
KNOWN_ATTRIBUTES = ("reference", "mount", "include", "exclude", "path", "layers", "warm", "lazyVerify",
                    "resolve")
RESOLVE_MODES = ("auto", "registry")  # auto: a ModelCache's revision of the tag on this node, else the registry
# Kubernetes owns every key under these prefixes (kubelet's pod info, the external-provisioner's
# csiProvisionerIdentity and --extra-create-metadata keys, and whatever they add later): never an error.
RESERVED_PREFIXES = ("csi.storage.k8s.io/", "storage.kubernetes.io/")


def unknown_keys(context: Mapping[str, str]) -> list[str]:
    """Keys that are neither ours nor under a prefix Kubernetes reserves (typos such as ``refrence``)."""
    return sorted(k for k in context if k not in KNOWN_ATTRIBUTES and not k.startswith(RESERVED_PREFIXES))


@dataclass(frozen=True)
class VolumeSpec:
    """What a volume asks for: a reference and how to expose it."""

    reference: Reference
    options: PullOptions
    mount: str = "bind"
    warm: bool = False
    ephemeral: bool = False
    strict: bool = False
    resolve: str = "auto"

    def fingerprint(self) -> str:
        """A stable digest of everything that changes what is mounted (for idempotency checks)."""
        text = f"{self.reference}|{self.options.variant()}|{self.mount}|{self.strict}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]


def pod_of(context: Mapping[str, str]) -> tuple[str, str, str]:
    """``(namespace, name, uid)`` of the pod a volume is for (kubelet sends them with podInfoOnMount)."""
    return context.get(POD_NAMESPACE_KEY, ""), context.get(POD_NAME_KEY, ""), context.get(POD_UID_KEY, "")


def _globs(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def parse_volume_context(context: Mapping[str, str], *, lazy_supported: bool = False) -> VolumeSpec:
    """Validate ``volumeAttributes`` (or StorageClass parameters); raise INVALID_ARGUMENT with a reason."""
    unknown = unknown_keys(context)
    if unknown:
        raise invalid(f"unknown volume attributes {unknown}; known: {', '.join(KNOWN_ATTRIBUTES)} "
                      f"(and any key under {' or '.join(RESERVED_PREFIXES)})")
    text = context.get("reference", "").strip()
    if not text:
        raise invalid("volume attribute 'reference' is required (e.g. registry.example.com/models/name:tag)")
    try:
        reference = parse_reference(text)
    except ModelCacheError as exc:
        raise invalid(f"volume attribute 'reference': {exc}") from None
    mount = context.get("mount", "bind").strip() or "bind"
    if mount not in MOUNT_TYPES:
        raise invalid(f"volume attribute 'mount' must be one of {', '.join(MOUNT_TYPES)}, not {mount!r}")
    if mount == "lazy" and not lazy_supported:
        raise invalid("volume attribute mount=lazy is not available on this node (FUSE lazy mounts are not enabled); "
                      "use mount=bind")
    warm = context.get("warm", "false").strip().lower()
    if warm not in ("true", "false", ""):
        raise invalid(f"volume attribute 'warm' must be \"true\" or \"false\", not {warm!r}")
    verify = context.get("lazyVerify", "").strip() or "background"
    if verify not in ("background", "strict"):
        raise invalid(f"volume attribute 'lazyVerify' must be \"background\" or \"strict\", not {verify!r}")
    resolve = context.get("resolve", "").strip() or "auto"
    if resolve not in RESOLVE_MODES:
        raise invalid(f"volume attribute 'resolve' must be one of {', '.join(RESOLVE_MODES)}, not {resolve!r}")
    path = context.get("path", "").strip() or None
    try:
        layers = parse_layer_kinds(context.get("layers", ""))
    except ModelCacheError as exc:
        raise invalid(f"volume attribute 'layers': {exc}") from None
    options = PullOptions(_globs(context.get("include", "")), _globs(context.get("exclude", "")), path, layers)
    return VolumeSpec(reference, options, mount, warm == "true", context.get(EPHEMERAL_KEY, "") == "true",
                      verify == "strict", resolve)


def check_capability(capability: csi_pb2.VolumeCapability, *, what: str = "volume_capability") -> None:
    """Refuse block access and access modes that imply writing from several nodes."""
    if not capability.HasField("access_mode"):
        raise invalid(f"{what}.access_mode is required")
    if capability.HasField("block"):
        raise invalid(f"{what}: block access is not supported; model volumes are read-only filesystems")
    if not capability.HasField("mount"):
        raise invalid(f"{what}: access type (mount) is required")
    if capability.access_mode.mode not in SUPPORTED_MODES:
        name = Mode.Name(capability.access_mode.mode)
        raise invalid(f"{what}: access mode {name} is not supported; model volumes are read-only "
                      f"(use a *_READER_ONLY mode)")


def capability_problem(capability: csi_pb2.VolumeCapability) -> str | None:
    """Why ``capability`` is unsupported, or None (for ValidateVolumeCapabilities, which never fails on it)."""
    try:
        check_capability(capability)
    except Exception as exc:  # noqa: BLE001 - CsiError carries the reason
        return str(exc)
    return None


def credentials_from_secrets(secrets: Mapping[str, str], registry_host: str) -> CredentialStore | None:
    """Credentials from a ``nodePublishSecretRef``: a ``.dockerconfigjson`` key or ``username`` + ``password``."""
    if not secrets:
        return None
    store = CredentialStore()
    if ".dockerconfigjson" in secrets:
        try:
            store.add_docker_config(secrets[".dockerconfigjson"], source="secret .dockerconfigjson")
        except ModelCacheError as exc:
            raise invalid(str(exc)) from None
    elif ".dockercfg" in secrets:
        try:
            store.add_docker_config(f'{{"auths": {secrets[".dockercfg"]}}}', source="secret .dockercfg")
        except ModelCacheError as exc:
            raise invalid(str(exc)) from None
    elif "username" in secrets or "password" in secrets:
        if not secrets.get("username") or not secrets.get("password"):
            raise invalid("secret must have both 'username' and 'password' keys")
        store.add(registry_host, Credentials(secrets["username"], secrets["password"]))
    else:
        raise invalid("secret has none of the keys .dockerconfigjson, .dockercfg, or username + password")
    return store


def secrets_fingerprint(secrets: Mapping[str, str]) -> str:
    """A one-way digest of a secret map, to tell pulls with different credentials apart."""
    digest = hashlib.sha256()
    for key in sorted(secrets):
        digest.update(key.encode() + b"\0" + secrets[key].encode() + b"\0")
    return digest.hexdigest()[:16] if secrets else ""
