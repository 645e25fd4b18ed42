"""Shared fixtures: real registries on loopback (open, htpasswd, token), proxies, caches."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelcache.cache import ModelCache
from modelcache.registry.client import RegistryClient
from modelcache.registry.credentials import Credentials, CredentialStore
from modelcache.registry.hosts import HostsConfig
from modelcache.registry.transport import RetryPolicy, Transport
from modelcache.store.content import ContentStore
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyBehaviour, RegistryProxy
from tests.helpers.registry import REGISTRY_BINARY, RunningRegistry, start_registry

USER, PASSWORD = "alice", "s3cret-Pa55word"
FAST_RETRY = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2, connect_timeout=2, read_timeout=2)

needs_registry = pytest.mark.skipif(REGISTRY_BINARY is None, reason="docker-registry binary not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mounts")


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    if REGISTRY_BINARY is None:
        pytest.skip("docker-registry binary not installed")
    running = start_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    if REGISTRY_BINARY is None or shutil.which("htpasswd") is None:
        pytest.skip("docker-registry or htpasswd (apache2-utils) not installed")
    workdir = tmp_path_factory.mktemp("auth-registry")
    htpasswd = workdir / "htpasswd"
    htpasswd.write_bytes(subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True,
                                        capture_output=True).stdout)
    running = start_registry(workdir, htpasswd=htpasswd)
    yield running
    running.stop()


def make_client(hosts: HostsConfig | None = None, credentials: CredentialStore | None = None,
                retry: RetryPolicy = FAST_RETRY) -> RegistryClient:
    return RegistryClient(Transport(hosts or HostsConfig(plain_http=True), credentials, retry))


def creds_for(host: str, user: str = USER, password: str = PASSWORD) -> CredentialStore:
    store = CredentialStore()
    store.add(host, Credentials(user, password))
    return store


@pytest.fixture
def fixtures(registry: RunningRegistry) -> Fixtures:
    return Fixtures(make_client(), registry.host)


@pytest.fixture
def auth_fixtures(auth_registry: RunningRegistry) -> Fixtures:
    return Fixtures(make_client(credentials=creds_for(auth_registry.host)), auth_registry.host)


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cache(cache_root: Path) -> ModelCache:
    return ModelCache(ContentStore(cache_root), make_client())


@pytest.fixture
def proxy_factory(registry: RunningRegistry) -> Iterator[object]:
    proxies: list[RegistryProxy] = []

    def make(behaviour: ProxyBehaviour | None = None, upstream: str | None = None) -> RegistryProxy:
        proxy = RegistryProxy(upstream or registry.host, behaviour)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def proxy_process(registry: RunningRegistry, tmp_path: Path) -> Iterator[object]:
    """Registry proxies in their own processes (throttled, corrupting, ...), logging each request."""
    from tests.helpers.proxy import ProxyProcess
    proxies: list[ProxyProcess] = []

    def make(bytes_per_second: float = 0, corrupt: bool = False, **behaviour: object) -> ProxyProcess:
        proxy = ProxyProcess(registry.host, bytes_per_second=bytes_per_second, corrupt=corrupt,
                             log=str(tmp_path / f"proxy-{len(proxies)}.log"), **behaviour)  # type: ignore[arg-type]
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
