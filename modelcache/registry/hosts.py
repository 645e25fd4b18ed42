"""Per-registry connection settings: mirrors, plain HTTP, TLS verification (like containerd's hosts.toml)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.reference import normalise_registry


@dataclass(frozen=True)
class Endpoint:
    """One place to send registry requests: ``scheme://host[:port]``."""

    url: str
    verify_tls: bool = True
    is_mirror: bool = False

    @property
    def host(self) -> str:
        """``host[:port]`` of the endpoint."""
        return urlsplit(self.url).netloc


@dataclass(frozen=True)
class RegistryHost:
    """Settings for one registry name."""

    mirrors: tuple[str, ...] = ()
    plain_http: bool = False
    insecure_skip_verify: bool = False


@dataclass
class HostsConfig:
    """Settings per registry host, with a default for hosts not listed."""

    hosts: dict[str, RegistryHost] = field(default_factory=dict)
    plain_http: bool = False

    def endpoints(self, registry: str, upstream_host: str, *, for_push: bool = False) -> list[Endpoint]:
        """Endpoints to try in order: mirrors first (never for pushes), then the upstream."""
        settings = self.hosts.get(registry, RegistryHost())
        scheme = "http" if (settings.plain_http or self.plain_http) else "https"
        verify = not settings.insecure_skip_verify
        result: list[Endpoint] = []
        if not for_push:
            for mirror in settings.mirrors:
                result.append(Endpoint(mirror.rstrip("/"), verify_tls=verify, is_mirror=True))
        result.append(Endpoint(f"{scheme}://{upstream_host}", verify_tls=verify))
        return result

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, plain_http: bool = False) -> HostsConfig:
        """Build from ``{"registries": {host: {mirrors: [...], plainHTTP: bool, insecureSkipVerify: bool}}}``."""
        registries = data.get("registries", {}) or {}
        if not isinstance(registries, Mapping):
            raise ModelCacheError("config: 'registries' must be a mapping", kind=Kind.INVALID_ARGUMENT)
        hosts: dict[str, RegistryHost] = {}
        for name, entry in registries.items():
            entry = entry or {}
            if not isinstance(entry, Mapping):
                raise ModelCacheError(f"config: registries.{name} must be a mapping", kind=Kind.INVALID_ARGUMENT)
            mirrors = entry.get("mirrors", []) or []
            if not isinstance(mirrors, list) or not all(isinstance(m, str) for m in mirrors):
                raise ModelCacheError(f"config: registries.{name}.mirrors must be a list of URLs",
                                      kind=Kind.INVALID_ARGUMENT)
            for mirror in mirrors:
                parts = urlsplit(mirror)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise ModelCacheError(f"config: mirror {mirror!r} of {name} must be http(s)://host[:port]",
                                          kind=Kind.INVALID_ARGUMENT)
            try:
                key = normalise_registry(str(name))  # the spelling references are parsed to
            except ValueError as exc:
                raise ModelCacheError(f"config: registries.{name}: {exc}", kind=Kind.INVALID_ARGUMENT) from None
            if key in hosts:
                raise ModelCacheError(f"config: registries.{name} repeats {key!r} under another spelling",
                                      kind=Kind.INVALID_ARGUMENT)
            hosts[key] = RegistryHost(
                mirrors=tuple(mirrors),
                plain_http=bool(entry.get("plainHTTP", False)),
                insecure_skip_verify=bool(entry.get("insecureSkipVerify", False)),
            )
        return cls(hosts=hosts, plain_http=plain_http or bool(data.get("plainHTTP", False)))
