"""Who may read a model is decided at its upstream registry, never at a mirror: a mirror (Spegel, a
pull-through cache) may serve anyone whatever the upstream would answer."""

from __future__ import annotations

import logging
from dataclasses import fields

from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.client import RegistryClient
from modelcache.registry.credentials import CredentialStore
from modelcache.registry.hosts import Endpoint, HostsConfig
from modelcache.registry.reference import Reference
from modelcache.registry.transport import Transport

log = logging.getLogger(__name__)


class _UpstreamOnly(HostsConfig):
    """Registry settings with the mirrors left out."""

    def endpoints(self, registry: str, upstream_host: str, *, for_push: bool = False) -> list[Endpoint]:
        """The upstream endpoint alone."""
        return [e for e in super().endpoints(registry, upstream_host, for_push=for_push) if not e.is_mirror]


def upstream_hosts(hosts: HostsConfig) -> HostsConfig:
    """``hosts`` without mirrors: requests go to upstream registries only."""
    return _UpstreamOnly(**{f.name: getattr(hosts, f.name) for f in fields(hosts)})


def _anonymous_upstream(transport: Transport) -> RegistryClient:
    """A client with ``transport``'s registry settings, to upstream registries only, without credentials."""
    return RegistryClient(Transport(upstream_hosts(transport.hosts), CredentialStore(), transport.retry,
                                    transport.user_agent, allowed_registries=transport.allowed_registries))


def is_private(transport: Transport, ref: Reference) -> bool:
    """Whether digest-pinned ``ref`` needs credentials at its upstream: reading it there through
    ``transport`` used some, or (when mirrors may have served it) an anonymous HEAD of its manifest there
    is refused. An upstream that cannot be asked counts as private: access could not be proven."""
    if transport.used_auth(ref.endpoint_host):
        return True
    if not any(e.is_mirror for e in transport.hosts.endpoints(ref.registry, ref.endpoint_host)):
        return False  # every request went to the upstream, without credentials
    try:
        _anonymous_upstream(transport).head_digest(ref)
    except ModelCacheError as exc:
        log.info("%s counts as private: its upstream refused an anonymous request (%s)", ref, exc.kind.value)
        return True
    return False


def check_upstream_access(client: RegistryClient, ref: Reference) -> None:
    """Make sure ``client`` (made with :func:`upstream_hosts` and the caller's credentials) may read
    digest-pinned ``ref`` (a HEAD of its manifest); raise UNAUTHENTICATED/PERMISSION_DENIED (a 404 is
    PERMISSION_DENIED) or UNAVAILABLE otherwise."""
    try:
        digest = client.head_digest(ref)
    except ModelCacheError as exc:
        if exc.kind is Kind.NOT_FOUND:
            raise ModelCacheError(f"access check: {exc}", kind=Kind.PERMISSION_DENIED) from None
        raise
    if digest != ref.digest:
        raise ModelCacheError("access check: the registry answered a different digest", kind=Kind.PERMISSION_DENIED)
