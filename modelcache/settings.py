"""Node-wide settings (a YAML or JSON file, e.g. from a ConfigMap) and the factory for a ready ModelCache."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modelcache.cache import (
    DEFAULT_CONNECTIONS,
    DEFAULT_EXPAND_RATIO,
    DEFAULT_MAX_MODEL_BYTES,
    DEFAULT_MAX_MODEL_FILES,
    DEFAULT_RANGED_MIN_SIZE,
    ModelCache,
)
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.client import RegistryClient
from modelcache.registry.credentials import CredentialStore, default_docker_config_path
from modelcache.registry.hosts import HostsConfig
from modelcache.registry.transport import RetryPolicy, Transport
from modelcache.store.content import DEFAULT_MAX_CONNECTIONS, DEFAULT_ROOT, ContentStore
from modelcache.trust.signatures import SignaturePolicy

KNOWN_KEYS = {"root", "registries", "plainHTTP", "dockerConfig", "pullWorkers", "maxExpandRatio",
              "highWatermark", "lowWatermark", "warmMemoryShare", "readTimeoutSeconds", "verifyIntervalHours",
              "signaturePolicy", "connectionsPerBlob", "rangedMinSizeMiB",
              "maxConnections", "allowedRegistries", "nodeCredentialRegistries", "maxModelGiB", "maxModelFiles"}


@dataclass
class Settings:
    """Everything a node process needs to reach registries and find its cache."""

    root: Path = DEFAULT_ROOT
    hosts: HostsConfig = field(default_factory=HostsConfig)
    docker_config: Path | None = None
    pull_workers: int = 4
    max_expand_ratio: int = DEFAULT_EXPAND_RATIO
    high_watermark: float = 0.85
    low_watermark: float = 0.70
    warm_memory_share: float = 0.5
    read_timeout: float = 30.0
    verify_interval_hours: float = 0.0  # the agent re-hashes the cache this often (0: never)
    connections_per_blob: int = DEFAULT_CONNECTIONS
    ranged_min_size: int = DEFAULT_RANGED_MIN_SIZE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    signature_policy: SignaturePolicy = field(default_factory=SignaturePolicy)
    # registries (globs on the normalised ``host[:port]``) a reference may name; empty: any registry
    allowed_registries: tuple[str, ...] = ()
    # registries (globs) for which the node-wide Docker config is lent to volumes; the agent and CLI always use it
    node_credential_registries: tuple[str, ...] = ()
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES  # a model's files in all, counted across its layers
    max_model_files: int = DEFAULT_MAX_MODEL_FILES  # entries of a model's tree, counted across its layers

    @classmethod
    def load(cls, path: Path | None) -> Settings:
        """Read ``path`` (YAML or JSON); None gives the defaults."""
        if path is None:
            return cls()
        try:
            data: Any = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ModelCacheError(f"config {path}: {exc}", kind=Kind.INVALID_ARGUMENT) from None
        return cls.from_mapping(data, str(path), base=path.parent)

    @classmethod
    def from_mapping(cls, data: Any, source: str = "config", base: Path | None = None) -> Settings:
        """Validate a parsed configuration mapping (relative key paths are relative to ``base``)."""
        if not isinstance(data, dict):
            raise ModelCacheError(f"{source}: must be a mapping", kind=Kind.INVALID_ARGUMENT)
        unknown = sorted(set(data) - KNOWN_KEYS)
        if unknown:
            raise ModelCacheError(f"{source}: unknown keys {unknown}", kind=Kind.INVALID_ARGUMENT)
        settings = cls(hosts=HostsConfig.from_mapping(data))
        try:
            if "root" in data:
                settings.root = Path(str(data["root"]))
            if data.get("dockerConfig"):
                settings.docker_config = Path(str(data["dockerConfig"]))
            settings.pull_workers = int(data.get("pullWorkers", settings.pull_workers))
            settings.max_expand_ratio = int(data.get("maxExpandRatio", settings.max_expand_ratio))
            settings.high_watermark = float(data.get("highWatermark", settings.high_watermark))
            settings.low_watermark = float(data.get("lowWatermark", settings.low_watermark))
            settings.warm_memory_share = float(data.get("warmMemoryShare", settings.warm_memory_share))
            settings.read_timeout = float(data.get("readTimeoutSeconds", settings.read_timeout))
            settings.verify_interval_hours = float(data.get("verifyIntervalHours", settings.verify_interval_hours))
            settings.connections_per_blob = int(data.get("connectionsPerBlob", settings.connections_per_blob))
            settings.max_connections = int(data.get("maxConnections", settings.max_connections))
            ranged_mib = float(data.get("rangedMinSizeMiB", settings.ranged_min_size / (1 << 20)))
            settings.ranged_min_size = int(ranged_mib * (1 << 20))
            settings.signature_policy = SignaturePolicy.from_mapping(data.get("signaturePolicy"), source, base)
            settings.allowed_registries = _globs(data, "allowedRegistries", source)
            settings.node_credential_registries = _globs(data, "nodeCredentialRegistries", source)
            settings.max_model_bytes = int(float(data.get("maxModelGiB", settings.max_model_bytes / (1 << 30)))
                                           * (1 << 30))
            settings.max_model_files = int(data.get("maxModelFiles", settings.max_model_files))
        except (TypeError, ValueError) as exc:
            raise ModelCacheError(f"{source}: {exc}", kind=Kind.INVALID_ARGUMENT) from None
        if not 0 < settings.low_watermark < settings.high_watermark <= 1:
            raise ModelCacheError(f"{source}: need 0 < lowWatermark < highWatermark <= 1", kind=Kind.INVALID_ARGUMENT)
        if settings.connections_per_blob < 1 or settings.ranged_min_size < 1 or settings.max_connections < 1:
            raise ModelCacheError(f"{source}: connectionsPerBlob, maxConnections and rangedMinSizeMiB must be positive",
                                  kind=Kind.INVALID_ARGUMENT)
        if settings.max_model_bytes < 1 or settings.max_model_files < 1:
            raise ModelCacheError(f"{source}: maxModelGiB and maxModelFiles must be positive",
                                  kind=Kind.INVALID_ARGUMENT)
        if settings.verify_interval_hours < 0:
            raise ModelCacheError(f"{source}: verifyIntervalHours must be >= 0", kind=Kind.INVALID_ARGUMENT)
        if not 0 < settings.warm_memory_share <= 1 or settings.pull_workers < 1 or settings.max_expand_ratio < 1:
            raise ModelCacheError(f"{source}: warmMemoryShare must be in (0, 1], pullWorkers and maxExpandRatio >= 1",
                                  kind=Kind.INVALID_ARGUMENT)
        return settings

    def to_mapping(self) -> dict[str, Any]:
        """The inverse of :meth:`from_mapping` (handed to helper processes)."""
        return {
            "root": str(self.root),
            "plainHTTP": self.hosts.plain_http,
            "registries": {name: {"mirrors": list(h.mirrors), "plainHTTP": h.plain_http,
                                  "insecureSkipVerify": h.insecure_skip_verify}
                           for name, h in self.hosts.hosts.items()},
            **({"dockerConfig": str(self.docker_config)} if self.docker_config else {}),
            "pullWorkers": self.pull_workers, "maxExpandRatio": self.max_expand_ratio,
            "highWatermark": self.high_watermark, "lowWatermark": self.low_watermark,
            "warmMemoryShare": self.warm_memory_share, "readTimeoutSeconds": self.read_timeout,
            "verifyIntervalHours": self.verify_interval_hours, "connectionsPerBlob": self.connections_per_blob,
            "rangedMinSizeMiB": self.ranged_min_size / (1 << 20), "maxConnections": self.max_connections,
            "allowedRegistries": list(self.allowed_registries),
            "nodeCredentialRegistries": list(self.node_credential_registries),
            "maxModelGiB": self.max_model_bytes / (1 << 30), "maxModelFiles": self.max_model_files,
        }

    def credentials(self, extra: CredentialStore | None = None, *, for_volume: bool = False) -> CredentialStore:
        """Node-wide credentials from the Docker config file, overridden by ``extra``. For a volume, the node's
        are lent only for registries in ``node_credential_registries``; the agent and the CLI use them all."""
        node = CredentialStore.from_docker_config_file(self.docker_config or default_docker_config_path())
        return (node.lent_for(self.node_credential_registries) if for_volume else node).merged(extra)

    def transport(self, extra: CredentialStore | None = None, retry: RetryPolicy | None = None, *,
                  for_volume: bool = False) -> Transport:
        """A transport with :meth:`credentials`, limited to ``allowed_registries``."""
        return Transport(self.hosts, self.credentials(extra, for_volume=for_volume),
                         retry or RetryPolicy(read_timeout=self.read_timeout),
                         allowed_registries=self.allowed_registries)

    def cache(self, extra: CredentialStore | None = None, retry: RetryPolicy | None = None, *,
              for_volume: bool = False) -> ModelCache:
        """A :class:`ModelCache` on ``root`` talking through :meth:`transport`."""
        return ModelCache(ContentStore(self.root, max_connections=self.max_connections),
                          RegistryClient(self.transport(extra, retry, for_volume=for_volume)),
                          workers=self.pull_workers, expand_ratio=self.max_expand_ratio,
                          connections_per_blob=self.connections_per_blob, ranged_min_size=self.ranged_min_size,
                          max_model_bytes=self.max_model_bytes, max_model_files=self.max_model_files)


def _globs(data: dict[str, Any], key: str, source: str) -> tuple[str, ...]:
    """A list of glob strings under ``key`` (absent: empty)."""
    value = data.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ModelCacheError(f"{source}: {key} must be a list of non-empty glob strings", kind=Kind.INVALID_ARGUMENT)
    return tuple(v.strip() for v in value)
