"""A mirror that refuses connections or cannot be reached costs one short try, then is skipped for a while
(issue 21): real registry, real dead endpoints (a closed port, a port whose accept queue is full, a port that
resets every connection), a clock the test moves for the hold-offs."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from modelcache.cache import ModelCache
from modelcache.errors import ModelCacheError
from modelcache.metrics import PullMetrics
from modelcache.registry.client import RegistryClient
from modelcache.registry.hosts import HostsConfig, RegistryHost
from modelcache.registry.mirrorhealth import MIRRORS, MirrorHealth
from modelcache.registry.transport import Transport
from modelcache.store.content import ContentStore
from tests.conftest import FAST_RETRY
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import RegistryProxy

FILES = {f"shard-{i}": bytes([i]) * (10_000 + i) for i in range(4)}  # four blobs, a config, a manifest


def closed_port() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class Resetter:
    """A port that accepts every connection, counts it and resets it at once."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            conn.close()

    def close(self) -> None:
        """Stop listening (a shutdown wakes the accepting thread, which holds the port until it returns)."""
        if self.server.fileno() != -1:
            self.server.shutdown(socket.SHUT_RDWR)
            self.server.close()


@pytest.fixture
def resetter() -> Iterator[Resetter]:
    r = Resetter()
    yield r
    r.close()


@pytest.fixture
def unanswered() -> Iterator[str]:
    """A loopback port that listens but never accepts, its accept queue full: new connections hang."""
    server = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = server.getsockname()[1]
    clients: list[socket.socket] = []
    while True:  # fill the queue until a connection no longer completes
        client = socket.socket()
        client.settimeout(0.3)
        clients.append(client)
        try:
            client.connect(("127.0.0.1", port))
        except TimeoutError:
            break
    yield f"http://127.0.0.1:{port}"
    for client in clients:
        client.close()
    server.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def cache_for(root: Path, upstream: str, mirror: str, health: MirrorHealth = MIRRORS) -> ModelCache:
    hosts = HostsConfig({upstream: RegistryHost(mirrors=(mirror,))}, plain_http=True)
    return ModelCache(ContentStore(root), RegistryClient(Transport(hosts, None, FAST_RETRY, mirrors=health)))


def timed_pull(cache: ModelCache, ref: str) -> float:
    started = time.monotonic()
    path = cache.pull(ref).path
    elapsed = time.monotonic() - started
    assert {p.name: p.read_bytes() for p in path.iterdir()} == FILES
    return elapsed


def down_logs(caplog: pytest.LogCaptureFixture, mirror: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "modelcache.registry.mirrorhealth" and mirror in r.getMessage()]


def mirror_tries(caplog: pytest.LogCaptureFixture, mirror: str) -> int:
    """Requests sent to ``mirror`` that failed (the transport logs each before it falls through)."""
    host = mirror.removeprefix("http://")
    return sum(1 for r in caplog.records if r.name == "modelcache.registry.transport"
               and r.getMessage().startswith(f"mirror {host} failed for "))


def test_refused_mirror_costs_one_try_and_is_counted(fixtures: Fixtures, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Before: ~3 s per request here (13 s for a small model with the default retry policy), every request."""
    fixtures.raw_model("mirrors/refused:v1", FILES)
    mirror = closed_port()
    metrics = CollectorRegistry()
    PullMetrics(metrics)
    caplog.set_level(logging.INFO, "modelcache.registry.mirrorhealth")
    caplog.set_level(logging.INFO, "modelcache.registry.transport")
    timed_pull(cache_for(tmp_path / "a", fixtures.host, mirror), fixtures.ref("mirrors/refused:v1"))
    assert mirror_tries(caplog, mirror) == 1  # the manifest's request; every later one skipped it
    timed_pull(cache_for(tmp_path / "b", fixtures.host, mirror), fixtures.ref("mirrors/refused:v1"))
    assert mirror_tries(caplog, mirror) == 1  # within the hold-off: not tried at all
    assert len(down_logs(caplog, mirror)) == 1 and "is down" in down_logs(caplog, mirror)[0]
    exposed = generate_latest(metrics).decode()
    assert f'ocimodel_mirror_down_total{{mirror="{mirror}"}} 1.0' in exposed
    skipped = next(line for line in exposed.splitlines() if line.startswith("ocimodel_mirrors_skipped "))
    assert float(skipped.split()[1]) >= 1


def test_unreachable_mirror_costs_under_a_second_once(fixtures: Fixtures, tmp_path: Path, unanswered: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A mirror whose connections never complete costs one short connect time-out, not one per request."""
    fixtures.raw_model("mirrors/unreachable:v1", FILES)
    caplog.set_level(logging.INFO, "modelcache.registry.mirrorhealth")
    caplog.set_level(logging.INFO, "modelcache.registry.transport")
    timed_pull(cache_for(tmp_path / "c", fixtures.host, unanswered), fixtures.ref("mirrors/unreachable:v1"))
    assert mirror_tries(caplog, unanswered) == 1  # one connect time-out, not one per request (its length: bench/)
    assert len(down_logs(caplog, unanswered)) == 1


def test_a_down_mirror_is_tried_once_per_hold_off_and_comes_back(fixtures: Fixtures, tmp_path: Path,
                                                                 resetter: Resetter,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """One connection per hold-off, not one per blob; the hold-off doubles while the mirror stays down; when
    it answers again it serves, and that is logged once."""
    fixtures.raw_model("mirrors/flaky:v1", FILES)
    ref = fixtures.ref("mirrors/flaky:v1")
    clock = Clock()
    health = MirrorHealth(first=30, longest=120, clock=clock)
    caplog.set_level(logging.INFO, "modelcache.registry.mirrorhealth")
    timed_pull(cache_for(tmp_path / "1", fixtures.host, resetter.url, health), ref)
    assert resetter.accepted == 1  # the manifest's request; every later one skipped it
    clock.now = 29
    timed_pull(cache_for(tmp_path / "2", fixtures.host, resetter.url, health), ref)
    assert resetter.accepted == 1
    clock.now = 30  # the hold-off ends: one request tries again, fails, and the hold-off doubles to 60 s
    timed_pull(cache_for(tmp_path / "3", fixtures.host, resetter.url, health), ref)
    assert resetter.accepted == 2
    clock.now = 89
    timed_pull(cache_for(tmp_path / "4", fixtures.host, resetter.url, health), ref)
    assert resetter.accepted == 2
    assert len(down_logs(caplog, resetter.url)) == 1 and health.down_counts() == {resetter.url: 1}
    # the mirror is back (a real one on the same port) and the hold-off has ended
    port = int(resetter.url.rsplit(":", 1)[1])
    resetter.close()
    mirror = RegistryProxy(fixtures.host, port=port)
    try:
        clock.now = 90
        timed_pull(cache_for(tmp_path / "5", fixtures.host, resetter.url, health), ref)
        assert sum(1 for _, path, _ in mirror.stats.requests if "/blobs/" in path) == len(FILES) + 1
    finally:
        mirror.close()
    assert health.skipped() == 0
    assert "is back" in down_logs(caplog, resetter.url)[-1] and len(down_logs(caplog, resetter.url)) == 2


def test_the_upstream_keeps_its_retries(resetter: Resetter, tmp_path: Path) -> None:
    """The upstream is never skipped: a connection failure there is retried as the policy says."""
    cache = ModelCache(ContentStore(tmp_path), RegistryClient(Transport(HostsConfig(plain_http=True), None,
                                                                        FAST_RETRY)))
    with pytest.raises(ModelCacheError, match=f"after {FAST_RETRY.attempts} attempts"):
        cache.pull(f"{resetter.url.removeprefix('http://')}/upstream/model:v1")
    assert resetter.accepted == FAST_RETRY.attempts


def test_concurrent_failures_hold_one_record() -> None:
    """Threads that find the same mirror down at once record it down once; one of them tries it again."""
    clock = Clock()
    health = MirrorHealth(clock=clock)
    threads = [threading.Thread(target=health.failed, args=("http://m", "ConnectionError")) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert health.down_counts() == {"http://m": 1} and health.skipped() == 1
    assert not health.usable("http://m")
    clock.now = 30  # the first hold-off, not lengthened by the seven other failures of the same outage
    tries = [health.usable("http://m") for _ in range(8)]
    assert tries.count(True) == 1
