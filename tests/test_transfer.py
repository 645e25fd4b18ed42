"""Mirrors, retries, resume (in-process and after kill -9), single-flight across processes, dedup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.hosts import HostsConfig, RegistryHost
from modelcache.registry.reference import parse_reference
from modelcache.store.content import ContentStore
from modelcache.upkeep.gc import usage
from tests.conftest import make_client
from tests.helpers.httpserver import QuietHandler, start_server
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import GatedProxy, ProxyBehaviour


def _pull_cli(ref: str, root: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "pull", ref, "--plain-http", "--root", str(root),
                             "--json", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_mirror_serves_before_upstream(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    data = os.urandom(100_000)
    fixtures.raw_model("mirror/model:v1", {"w": data})
    mirror = proxy_factory()
    upstream = proxy_factory()
    hosts = HostsConfig({upstream.host: RegistryHost(mirrors=(f"http://{mirror.host}",))}, plain_http=True)
    cache = ModelCache(ContentStore(cache_root), make_client(hosts))
    assert (cache.pull(f"{upstream.host}/mirror/model:v1").path / "w").read_bytes() == data
    assert mirror.stats.blob_gets[str(Digest.of_bytes(data))] == 1
    # the upstream only answers whether the model is private (an anonymous HEAD of the pinned manifest):
    # a mirror may serve anyone, so it never decides access; every byte came from the mirror
    assert [(method, path.split("/manifests/")[0]) for method, path, _ in upstream.stats.requests] == [
        ("HEAD", "/v2/mirror/model")]
    assert cache.get_record(next(r.key for r in cache.records())).auth_required is False
    expected_ns = "ns=" + upstream.host.replace(":", "%3A")
    assert all(expected_ns in path for _, path, _ in mirror.stats.requests)


@pytest.mark.parametrize("behaviour", [ProxyBehaviour(not_found=True), ProxyBehaviour(fail_status=503, fail_times=99),
                                       None], ids=["mirror-404", "mirror-503", "mirror-down"])
def test_mirror_failure_falls_back_to_upstream(fixtures: Fixtures, proxy_factory, cache_root: Path,
                                               behaviour) -> None:
    data = os.urandom(50_000)
    fixtures.raw_model("mirror/fallback:v1", {"w": data})
    upstream = proxy_factory()
    mirror_url = "http://127.0.0.1:9" if behaviour is None else f"http://{proxy_factory(behaviour).host}"
    hosts = HostsConfig({upstream.host: RegistryHost(mirrors=(mirror_url,))}, plain_http=True)
    cache = ModelCache(ContentStore(cache_root), make_client(hosts))
    assert (cache.pull(f"{upstream.host}/mirror/fallback:v1").path / "w").read_bytes() == data
    assert upstream.stats.blob_gets[str(Digest.of_bytes(data))] == 1


def test_transient_5xx_is_retried(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    fixtures.raw_model("retry/model:v1", {"w": b"r" * 1000})
    proxy = proxy_factory(ProxyBehaviour(fail_status=503, fail_times=2))
    cache = ModelCache(ContentStore(cache_root), make_client())
    assert (cache.pull(f"{proxy.host}/retry/model:v1").path / "w").read_bytes() == b"r" * 1000
    assert len(proxy.stats.requests) >= 3


def test_unreachable_registry_is_unavailable(cache_root: Path) -> None:
    cache = ModelCache(ContentStore(cache_root), make_client())
    with pytest.raises(ModelCacheError) as info:
        cache.pull("127.0.0.1:9/nothing/here:v1")
    assert info.value.kind is Kind.UNAVAILABLE


def test_tls_handshake_failure_is_not_retried_and_names_the_setting(cache_root: Path) -> None:
    """A registry that speaks plain HTTP, asked over TLS: one connection, then a clear error."""
    import socket
    import threading

    from modelcache.registry.client import RegistryClient
    from modelcache.registry.transport import RetryPolicy, Transport

    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def answer_in_plain_http() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(1)
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=answer_in_plain_http, daemon=True).start()
    host = f"127.0.0.1:{server.getsockname()[1]}"
    client = RegistryClient(Transport(HostsConfig(), None, RetryPolicy(attempts=5, base_delay=0.05)))
    try:
        with pytest.raises(ModelCacheError) as info:
            ModelCache(ContentStore(cache_root), client).pull(f"{host}/plain/model:v1")
    finally:
        server.close()
    assert accepted == [1]
    assert "plainHTTP: true" in str(info.value) and "--plain-http" in str(info.value)
    assert info.value.kind is Kind.UNAVAILABLE


def test_broken_stream_resumes_with_range(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    data = os.urandom(3_000_000)
    fixtures.raw_model("resume/inproc:v1", {"w": data})
    proxy = proxy_factory(ProxyBehaviour(cut_after_bytes=1_000_000, cut_times=1))
    cache = ModelCache(ContentStore(cache_root), make_client())
    result = cache.pull(f"{proxy.host}/resume/inproc:v1")
    assert (result.path / "w").read_bytes() == data
    ranges = [h.get("range") for m, p, h in proxy.stats.requests if m == "GET" and "/blobs/" in p and h.get("range")]
    assert ranges and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"
    assert result.downloaded_bytes == len(data)  # nothing fetched twice


def test_range_reads_reuse_their_connection(fixtures: Fixtures, proxy_factory) -> None:
    """A lazy read or a ranged piece asks one range per request: each whole answer hands its connection back
    (a new TCP and TLS handshake per range would cost more than a small range itself); a range left unread
    does not, so a connection never carries the rest of an old answer into a new request."""
    data = os.urandom(3_000_000)  # larger than one read: a reader can stop mid-answer
    fixtures.raw_model("reuse/model:v1", {"w": data})
    proxy = proxy_factory(ProxyBehaviour(keep_alive=True))
    client = make_client()
    ref = parse_reference(f"{proxy.host}/reuse/model:v1")
    digest = Digest.of_bytes(data)
    got = bytearray(len(data))

    def write(offset: int, view: memoryview) -> None:
        got[offset:offset + len(view)] = view

    client.resolve(ref)
    before = proxy.stats.connections
    for start in range(0, len(data), 300_000):
        client.download_range(ref, digest, len(data), start, 300_000, write)
    assert bytes(got) == data
    assert proxy.stats.connections == before  # ten ranges, on the connection the manifest came over

    class Enough(Exception):
        """The reader has read enough."""

    def stop(offset: int, view: memoryview) -> None:
        raise Enough
    with pytest.raises(Enough):  # a reader that gives up mid-answer
        client.download_range(ref, digest, len(data), 0, len(data), stop)
    client.download_range(ref, digest, len(data), 0, 100_000, write)
    assert proxy.stats.connections == before + 1  # the half-read connection was closed, not reused
    assert bytes(got) == data


class _BlobServer:
    """A hand-written registry front serving one blob (Range too) over keep-alive HTTP/1.1, each behaviour a
    hostile or careless server's: ``close_reused`` closes a connection, unanswered, when a second request
    comes on it (an idle time-out racing the reuse); ``redirect_held`` answers a blob GET with a same-origin
    307 whose declared body never comes."""

    def __init__(self, data: bytes, *, close_reused: bool = False, redirect_held: bool = False) -> None:
        self.answered, self.dropped = 0, 0  # counted before the answer goes out (the client may be done first)
        self.lock = threading.Lock()
        self.release = threading.Event()
        server = self

        class Handler(QuietHandler):
            def setup(self) -> None:
                super().setup()
                self.requests_here = 0

            def do_GET(self) -> None:
                self.requests_here += 1
                if close_reused and self.requests_here > 1:
                    with server.lock:
                        server.dropped += 1
                    self.close_connection = True
                    return
                if redirect_held and "/blobs/" in self.path:
                    self.send_response(307)
                    self.send_header("Location", "/held-out/blob")
                    self.send_header("Content-Encoding", "gzip")
                    self.send_header("Content-Length", str(1 << 30))
                    self.end_headers()
                    self.wfile.flush()
                    server.release.wait()
                    self.close_connection = True
                    return
                first, _, last = self.headers.get("Range", "").removeprefix("bytes=").partition("-")
                start, end = (int(first), int(last)) if first else (0, len(data) - 1)
                with server.lock:
                    server.answered += 1
                self.send_response(206 if first else 200)
                if first:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.send_header("Content-Length", str(end + 1 - start))
                self.end_headers()
                self.wfile.write(data[start:end + 1])

        self.http = start_server(Handler)
        self.host = f"127.0.0.1:{self.http.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


def test_a_mirror_closing_a_reused_connection_is_asked_again_not_marked_down(registry) -> None:  # type: ignore[no-untyped-def]
    """Mirrors get one attempt; a kept-alive connection that the mirror closed as it was reused is not that
    attempt (no answer came): the request goes again on a new connection, the mirror stays in use."""
    data = os.urandom(200_000)
    mirror = _BlobServer(data, close_reused=True)
    try:
        hosts = HostsConfig({registry.host: RegistryHost(mirrors=(f"http://{mirror.host}",))}, plain_http=True)
        client = make_client(hosts)
        ref, digest = parse_reference(f"{registry.host}/stale/model:v1"), Digest.of_bytes(data)
        got = bytearray(len(data))

        def write(offset: int, view: memoryview) -> None:
            got[offset:offset + len(view)] = view
        for start in range(0, len(data), 50_000):
            client.download_range(ref, digest, len(data), start, 50_000, write)
        assert bytes(got) == data
        assert mirror.answered == 4 and mirror.dropped == 3  # every range from the mirror, three asked twice
        assert client.transport.mirrors.usable(f"http://{mirror.host}")
    finally:
        mirror.close()


def test_a_redirect_body_is_never_read() -> None:
    """A 3xx is followed by its Location alone: its body (here a declared GiB of gzip that never comes) is not
    read, decompressed or waited for (requests would read it whole, unbounded, even with redirects off)."""
    data = os.urandom(100_000)
    server = _BlobServer(data, redirect_held=True)
    try:
        client = make_client()
        got = bytearray(len(data))

        def write(offset: int, view: memoryview) -> None:
            got[offset:offset + len(view)] = view
        client.download_range(parse_reference(f"{server.host}/redirect/model:v1"), Digest.of_bytes(data), len(data),
                              0, len(data), write)
        assert bytes(got) == data and server.answered == 1
    finally:
        server.close()


def test_registry_ignoring_range_restarts_cleanly(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    data = os.urandom(2_000_000)
    fixtures.raw_model("resume/norange:v1", {"w": data})
    proxy = proxy_factory(ProxyBehaviour(cut_after_bytes=500_000, cut_times=1, ignore_range=True))
    cache = ModelCache(ContentStore(cache_root), make_client())
    assert (cache.pull(f"{proxy.host}/resume/norange:v1").path / "w").read_bytes() == data


def test_resume_after_kill_9(fixtures: Fixtures, registry, cache_root: Path) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(8_000_000)
    fixtures.raw_model("resume/kill:v1", {"w": data})
    proxy = GatedProxy(registry.host, hold_from=4 << 20)  # the pull cannot finish before the kill
    try:
        ref = f"{proxy.host}/resume/kill:v1"
        process = _pull_cli(ref, cache_root)
        partial = cache_root / "ingest" / f"sha256-{Digest.of_bytes(data).hex}"
        deadline = time.monotonic() + 60
        while not partial.exists() or partial.stat().st_size < 2_000_000:
            assert time.monotonic() < deadline and process.poll() is None, process.poll()
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        written = partial.stat().st_size
        assert 0 < written < len(data)
        assert list((cache_root / "trees").iterdir()) == []
        proxy.gate.set()
        cache = ModelCache(ContentStore(cache_root), make_client())
        result = cache.pull(ref)
    finally:
        proxy.gate.set()
        proxy.close()
    assert (result.path / "w").read_bytes() == data
    assert result.downloaded_bytes <= len(data) - written
    assert not partial.exists()


def test_concurrent_processes_fetch_each_blob_once(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    files = {f"shard-{i}.safetensors": os.urandom(1_500_000) for i in range(3)}
    fixtures.raw_model("single/flight:v1", files)
    proxy = proxy_factory(ProxyBehaviour(bytes_per_second=20_000_000))
    processes = [_pull_cli(f"{proxy.host}/single/flight:v1", cache_root) for _ in range(4)]
    outputs = [p.communicate(timeout=120) for p in processes]
    assert all(p.returncode == 0 for p in processes), [o[1] for o in outputs]
    for data in files.values():
        assert proxy.stats.blob_gets[str(Digest.of_bytes(data))] == 1
    paths = {__import__("json").loads(out)["path"] for out, _ in outputs}
    assert len(paths) == 1


def test_concurrent_threads_share_one_pull(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    data = os.urandom(2_000_000)
    fixtures.raw_model("single/threads:v1", {"w": data})
    proxy = proxy_factory(ProxyBehaviour(bytes_per_second=10_000_000))
    cache = ModelCache(ContentStore(cache_root), make_client())
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: cache.pull(f"{proxy.host}/single/threads:v1"), range(8)))
    assert {r.path for r in results} == {results[0].path}
    assert proxy.stats.blob_gets[str(Digest.of_bytes(data))] == 1


def test_two_models_sharing_a_shard_share_one_inode(fixtures: Fixtures, cache: ModelCache) -> None:
    shared = os.urandom(1_000_000)
    fixtures.raw_model("dedup/a:v1", {"shared.safetensors": shared, "a.json": b"a"})
    fixtures.raw_model("dedup/b:v1", {"weights/shared.safetensors": shared, "b.json": b"b"})
    a = cache.pull(fixtures.ref("dedup/a:v1"))
    b = cache.pull(fixtures.ref("dedup/b:v1"))
    assert b.downloaded_bytes < 1000  # the shard was already there
    ino_a = (a.path / "shared.safetensors").stat()
    ino_b = (b.path / "weights/shared.safetensors").stat()
    assert ino_a.st_ino == ino_b.st_ino and ino_a.st_nlink == 3  # blob + two trees
    du = usage(cache)
    assert du.logical_bytes == 2 * len(shared) + 2
    assert len(shared) <= du.disk_bytes < 2 * len(shared)
    assert du.shared_bytes >= len(shared) - 65536  # block rounding of the small blobs


class _ForwardProxy(QuietHandler):
    """An HTTP forward proxy (requests send it absolute URLs): relays to the registry, recording each URL."""

    seen: list[str] = []

    def _relay(self) -> None:
        type(self).seen.append(self.path)
        with requests.Session() as session:
            session.trust_env = False  # the test's proxy settings are for the client under test
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "proxy-connection")}
            answer = session.request(self.command, self.path, headers=headers)
        body = b"" if self.command == "HEAD" else answer.content
        self.send_response(answer.status_code)
        for name, value in answer.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.content) if self.command == "HEAD" else len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = _relay  # noqa: N815


def test_proxies_from_the_environment_are_used_per_origin(fixtures: Fixtures, registry, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """HTTP_PROXY and NO_PROXY from the environment apply to each origin as requests would apply them (the
    session works them out once per origin): one client reaches the registry by a proxied name through the
    proxy and by a NO_PROXY name directly."""
    fixtures.raw_model("env/proxy:v1", {"w": b"weights"})
    port = registry.host.rsplit(":", 1)[1]
    server = start_server(_ForwardProxy)
    _ForwardProxy.seen = []
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("NO_PROXY", "localhost")
    try:
        client = make_client()
        for _ in range(2):  # the second time from what the session worked out the first
            client.resolve(parse_reference(f"127.0.0.1:{port}/env/proxy:v1"))
            client.resolve(parse_reference(f"localhost:{port}/env/proxy:v1"))
        assert _ForwardProxy.seen and all(url.startswith(f"http://127.0.0.1:{port}/") for url in _ForwardProxy.seen)
        assert len([url for url in _ForwardProxy.seen if "/manifests/" in url]) == 2  # one per proxied resolve
    finally:
        server.shutdown()
        server.server_close()
