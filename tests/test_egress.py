"""What a pod author's registry can make the node contact: the admin's allow-list, token realms, redirects,
upload locations and the size of what a registry answers. Hostile registries here are real HTTP(S) servers
on loopback (and on the machine's own address, to stand for a registry that is not on loopback)."""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError, RegistryError
from modelcache.push import push_directory
from modelcache.registry.client import RegistryClient
from modelcache.registry.egress import AddressClass, classify, registry_allowed
from modelcache.registry.hosts import HostsConfig
from modelcache.registry.reference import parse_reference
from modelcache.settings import Settings
from modelcache.store.content import ContentStore
from tests.conftest import FAST_RETRY, PASSWORD, USER, creds_for, make_client
from tests.helpers.httpserver import QuietHandler, start_server
from tests.helpers.oci import Fixtures
from tests.helpers.registry import RunningRegistry

BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


Answer = Callable[["Hostile", BaseHTTPRequestHandler], None]


@dataclass
class Hostile:
    """A real HTTP(S) server on ``address`` answering every request with ``answer``; records what it was sent."""

    address: str
    answer: Answer
    tls: ssl.SSLContext | None = None
    seen: list[Seen] = field(default_factory=list)
    sent_bytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        hostile = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                hostile.seen.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                hostile.answer(hostile, self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_GET

        self.server = start_server(Handler, self.address, tls=self.tls)

    @property
    def host(self) -> str:
        return f"{self.address}:{self.server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def reply(h: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def forward(upstream: str, h: BaseHTTPRequestHandler) -> None:
    """Answer with what the real registry at ``upstream`` answers (no credentials sent on)."""
    connection = http.client.HTTPConnection(upstream, timeout=30)
    headers = {k: v for k, v in h.headers.items() if k.lower() in ("accept", "range")}
    connection.request(h.command, h.path.split("?", 1)[0], headers=headers)
    response = connection.getresponse()
    body = response.read()
    reply(h, response.status, body, {k: v for k, v in response.getheaders()
                                     if k.lower() in ("content-type", "docker-content-digest", "content-range")})
    connection.close()


def not_found(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
    reply(h, 404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"nothing here"}]}')


def basic_required(h: BaseHTTPRequestHandler) -> bool:
    """Answer 401 unless ``h`` carries the test user's Basic credentials; True when it did."""
    if h.headers.get("Authorization") == BASIC:
        return True
    reply(h, 401, b"", {"WWW-Authenticate": 'Basic realm="hostile"'})
    return False


def bearer_to(realm: str) -> Answer:
    def answer(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        reply(h, 401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="hostile"'})
    return answer


@pytest.fixture
def serve() -> Iterator[Callable[..., Hostile]]:
    servers: list[Hostile] = []

    def make(address: str, answer: Answer, tls: ssl.SSLContext | None = None) -> Hostile:
        server = Hostile(address, answer, tls)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ssl.SSLContext]:
    """A CA and a server certificate for 127.0.0.2 and 127.0.0.3 (stands for a registry's CDN or token host)."""
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=ocimodel test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=cdn")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.2,IP:127.0.0.3\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "leaf.pem", "-days", "2", "-extfile", "ext")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(d / "leaf.pem", d / "leaf.key")
    return d / "ca.pem", context


@pytest.fixture
def trusted_tls(test_ca: tuple[Path, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """The node trusts the test CA (as it would a public CA), through requests' own CA bundle setting."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(test_ca[0]))
    return test_ca[1]


def own_address() -> str | None:
    """An address of this machine that is not loopback (None when there is none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def refused(call: Callable[[], object]) -> ModelCacheError:
    with pytest.raises(ModelCacheError) as info:
        call()
    assert info.value.kind is Kind.REFUSED, info.value
    return info.value


# -- the admin's allow-list ---------------------------------------------------------------------------------
def test_registry_outside_allowed_registries_is_never_contacted(fixtures: Fixtures, serve, tmp_path: Path) -> None:
    fixtures.raw_model("allowed/model:v1", {"w": b"allowed"})
    outsider = serve("127.0.0.2", not_found)
    settings = Settings.from_mapping({"plainHTTP": True, "allowedRegistries": ["127.0.0.1:*", "registry.example"]})
    cache = ModelCache(ContentStore(tmp_path / "cache"), RegistryClient(settings.transport(retry=FAST_RETRY)))
    error = refused(lambda: cache.pull(f"{outsider.host}/some/model:v1"))
    assert outsider.host in str(error) and "allowedRegistries" in str(error)
    model = tmp_path / "model"
    model.mkdir()
    (model / "w.safetensors").write_bytes(b"w")
    refused(lambda: push_directory(cache.client, model, parse_reference(f"{outsider.host}/pushed:v1")))
    assert outsider.seen == []
    assert (cache.pull(fixtures.ref("allowed/model:v1")).path / "w").read_bytes() == b"allowed"


@pytest.mark.parametrize("registry,patterns,allowed", [
    ("registry.example.com", [], True),
    ("Registry.Example.COM", ["registry.example.com"], True),
    ("registry.example.com:443", ["REGISTRY.example.com"], True),
    ("registry.example.com", ["registry.example.com:443"], True),
    ("registry-1.docker.io", ["docker.io"], True),
    ("docker.io", ["index.docker.io"], True),
    ("team.registry.example.com", ["*.registry.example.com"], True),
    ("registry.example.com:5000", ["registry.example.com"], False),
    ("registry.example.com.evil.io", ["registry.example.com"], False),
    ("evil.io", ["*.registry.example.com"], False),
    ("[::1]:5000", ["[::1]:5000"], True),
])
def test_allowed_registries_match_normalised_names(registry: str, patterns: list[str], allowed: bool) -> None:
    assert registry_allowed(registry, patterns) is allowed


@pytest.mark.parametrize("address,expected", [
    ("169.254.169.254", AddressClass.METADATA), ("::ffff:169.254.169.254", AddressClass.METADATA),
    ("64:ff9b::a9fe:a9fe", AddressClass.METADATA), ("fd00:ec2::254", AddressClass.METADATA),
    ("169.254.1.1", AddressClass.LINK_LOCAL), ("fe80::1%eth0", AddressClass.LINK_LOCAL),
    ("127.0.0.2", AddressClass.LOOPBACK), ("0.0.0.0", AddressClass.LOOPBACK), ("::1", AddressClass.LOOPBACK),
    ("10.96.0.1", AddressClass.PRIVATE), ("fd12::1", AddressClass.PRIVATE), ("8.8.8.8", AddressClass.GLOBAL),
])
def test_address_classes(address: str, expected: AddressClass) -> None:
    assert classify(address) is expected


# -- Bearer token realms ------------------------------------------------------------------------------------
def test_bearer_realm_must_be_https_for_a_tls_registry(serve, trusted_tls) -> None:
    token_service = serve("127.0.0.3", not_found)
    registry = serve("127.0.0.2", bearer_to(f"{token_service.url}/token"), tls=trusted_tls)
    client = make_client(hosts=HostsConfig(), credentials=creds_for(registry.host))
    error = refused(lambda: client.resolve(parse_reference(f"{registry.host}/m:v1")))
    assert "https" in str(error)
    assert token_service.seen == []


@pytest.mark.parametrize("realm", ["http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                                   "http://[::ffff:169.254.169.254]/latest/api/token",
                                   "http://169.254.170.2/v2/credentials/x"])
def test_bearer_realm_on_a_metadata_address_is_refused(serve, realm: str) -> None:
    registry = serve("127.0.0.2", bearer_to(realm))
    refused(lambda: make_client().resolve(parse_reference(f"{registry.host}/m:v1")))


def test_a_metadata_address_is_no_registry() -> None:
    refused(lambda: make_client().resolve(parse_reference("169.254.169.254/latest/meta-data:v1")))


def test_a_registry_off_loopback_cannot_send_the_node_to_its_loopback(serve) -> None:
    address = own_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")
    local_service = serve("127.0.0.1", not_found)  # stands for kubelet's or the agent's loopback endpoints
    registry = serve(address, bearer_to(f"{local_service.url}/token"))
    refused(lambda: make_client().resolve(parse_reference(f"{registry.host}/m:v1")))
    assert local_service.seen == []


def test_a_kept_alive_connection_is_checked_again_for_each_request(serve) -> None:
    """A connection the node keeps open to a loopback registry is not reused for a token request that a
    registry off loopback names (one thread, one pool)."""
    address = own_address()
    if address is None:
        pytest.skip("this machine has no address besides loopback")

    def loopback_registry(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        reply(h, 200 if h.path.startswith("/token") else 404, b'{"token": "t0ken"}')

    local = serve("127.0.0.3", loopback_registry)
    client = make_client()
    with pytest.raises(RegistryError):
        client.resolve(parse_reference(f"{local.host}/m:v1"))
    remote = serve(address, bearer_to(f"{local.url}/token"))
    refused(lambda: client.resolve(parse_reference(f"{remote.host}/m:v1")))
    assert not any(s.path.startswith("/token") for s in local.seen)


def test_registry_credentials_go_to_a_token_service_on_another_host_only_over_https(serve, trusted_tls) -> None:
    def issue(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        reply(h, 200, b'{"token": "t0ken"}')

    plain = serve("127.0.0.3", issue)
    registry = serve("127.0.0.2", bearer_to(f"{plain.url}/token"))
    client = make_client(credentials=creds_for(registry.host))
    with pytest.raises(RegistryError):
        client.resolve(parse_reference(f"{registry.host}/m:v1"))
    assert plain.seen and all("authorization" not in s.headers for s in plain.seen)

    tls = serve("127.0.0.3", issue, tls=trusted_tls)
    registry.answer = bearer_to(f"{tls.url}/token")
    with pytest.raises(RegistryError):
        client.resolve(parse_reference(f"{registry.host}/m:v1"))
    assert tls.seen and all(s.headers.get("authorization") == BASIC for s in tls.seen)  # as Docker does
    assert all(s.headers.get("authorization", "Bearer t0ken") == "Bearer t0ken" for s in registry.seen)


@pytest.mark.parametrize("spelling", ["{other}\\@{registry}", "{registry}@{other}", "{other}\t@{registry}"])
def test_a_realm_spelled_to_look_like_the_registry_gets_no_credentials(serve, spelling: str) -> None:
    """urlsplit reads the host after a backslash; requests connects to the one before it: such a realm, and
    one with userinfo, is refused rather than taken for the registry's own origin."""
    def issue(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        reply(h, 200, b'{"token": "t0ken"}')

    other = serve("127.0.0.3", issue)
    registry = serve("127.0.0.2", not_found)
    registry.answer = bearer_to("http://" + spelling.format(other=other.host, registry=registry.host) + "/token")
    refused(lambda: make_client(credentials=creds_for(registry.host)).resolve(
        parse_reference(f"{registry.host}/m:v1")))
    assert other.seen == []


@pytest.mark.timeout(20)
@pytest.mark.parametrize("length", [7000, 60000])
def test_a_long_challenge_costs_no_cpu(serve, length: int) -> None:
    """A challenge of word characters without '=' took the parameter regex quadratic time (84 s for 60 KB):
    parsing is linear, and a challenge over 8 KiB is refused."""
    registry = serve("127.0.0.2", lambda hostile, h: reply(h, 401, b"", {"WWW-Authenticate": "Bearer " + "a" * length}))
    with pytest.raises(RegistryError) as info:
        make_client().resolve(parse_reference(f"{registry.host}/m:v1"))
    assert info.value.kind is Kind.UNAUTHENTICATED
    assert ("8192" in str(info.value)) is (length > 8192)


# -- redirects ----------------------------------------------------------------------------------------------
def test_redirect_to_plain_http_on_another_host_is_not_followed(serve) -> None:
    elsewhere = serve("127.0.0.3", not_found)

    def redirect(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        reply(h, 307, b"", {"Location": f"{elsewhere.url}/internal/admin?do=it"})

    registry = serve("127.0.0.2", redirect)
    refused(lambda: make_client().resolve(parse_reference(f"{registry.host}/m:v1")))
    assert elsewhere.seen == []


@pytest.mark.parametrize("spelling", ["{other}\\@{registry}", "{registry}@{other}"])
def test_a_redirect_spelled_to_look_like_the_registry_is_not_followed(serve, spelling: str) -> None:
    elsewhere = serve("127.0.0.3", not_found)

    def redirect(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        if basic_required(h):
            where = spelling.format(other=elsewhere.host, registry=hostile.host)
            reply(h, 307, b"", {"Location": f"http://{where}/internal"})

    registry = serve("127.0.0.2", redirect)
    refused(lambda: make_client(credentials=creds_for(registry.host)).resolve(
        parse_reference(f"{registry.host}/m:v1")))
    assert elsewhere.seen == []


def test_redirect_loops_end(serve) -> None:
    def loop(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        reply(h, 307, b"", {"Location": h.path + "x"})

    registry = serve("127.0.0.2", loop)
    with pytest.raises(RegistryError) as info:
        make_client().resolve(parse_reference(f"{registry.host}/m:v1"))
    assert "redirect" in str(info.value)
    assert len(registry.seen) <= 3 * 11  # a few hops per attempt, not requests' 30


def bearer_required(h: BaseHTTPRequestHandler, realm: str) -> bool:
    """Issue a token for Basic credentials at /token; answer 401 unless ``h`` carries it; True when it did."""
    if h.path.startswith("/token"):
        ok = h.headers.get("Authorization") == BASIC
        reply(h, 200 if ok else 401, b'{"token": "t0ken"}' if ok else b"")
        return False
    if h.headers.get("Authorization") == "Bearer t0ken":
        return True
    reply(h, 401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="front"'})
    return False


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_blob_redirect_to_an_https_cdn_works_and_carries_no_credentials(registry: RunningRegistry, fixtures: Fixtures,
                                                                      serve, trusted_tls, tmp_path: Path,
                                                                      scheme: str) -> None:
    fixtures.raw_model("cdn/model:v1", {"w": b"from the cdn" * 1000})
    cdn = serve("127.0.0.3", lambda hostile, h: forward(registry.host, h), tls=trusted_tls)

    def front(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        if not (basic_required(h) if scheme == "basic" else bearer_required(h, f"{hostile.url}/token")):
            return
        if "/blobs/" in h.path and h.command == "GET":
            return reply(h, 307, b"", {"Location": f"{cdn.url}{h.path}?X-Amz-Signature=presigned"})
        forward(registry.host, h)

    registry_front = serve("127.0.0.2", front)
    cache = ModelCache(ContentStore(tmp_path / "cache"), make_client(credentials=creds_for(registry_front.host)))
    assert (cache.pull(f"{registry_front.host}/cdn/model:v1").path / "w").read_bytes() == b"from the cdn" * 1000
    assert any(s.headers.get("authorization") for s in registry_front.seen)
    assert cdn.seen and all("authorization" not in s.headers for s in cdn.seen)


# -- pushes -------------------------------------------------------------------------------------------------
def uploads_to(location: str) -> Answer:
    def answer(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        if not basic_required(h):
            return
        if h.command == "HEAD":
            return reply(h, 404)
        if h.command == "POST":
            return reply(h, 202, b"", {"Location": location})
        reply(h, 201)
    return answer


def test_upload_location_on_another_host_gets_no_credentials(serve, trusted_tls) -> None:
    def accept(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        reply(h, 201)

    plain = serve("127.0.0.3", accept)
    registry = serve("127.0.0.2", uploads_to(f"{plain.url}/upload/1?state=x"))
    client = make_client(credentials=creds_for(registry.host))
    ref = parse_reference(f"{registry.host}/pushed:v1")
    refused(lambda: client.upload_blob(ref, Digest.of_bytes(b"layer"), 5, b"layer"))
    assert plain.seen == []

    tls = serve("127.0.0.3", accept, tls=trusted_tls)
    registry.answer = uploads_to(f"{tls.url}/upload/1?state=x")
    client.upload_blob(ref, Digest.of_bytes(b"layer"), 5, b"layer")
    assert [s.method for s in tls.seen] == ["PUT"] and "authorization" not in tls.seen[0].headers


# -- bodies -------------------------------------------------------------------------------------------------
def endless(status: int, headers: dict[str, str] | None = None) -> Answer:
    """Answer ``status`` with 128 MiB of body, counting what the client let through before hanging up."""
    def answer(hostile: Hostile, h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Type", "application/json")
        h.send_header("Connection", "close")
        h.end_headers()
        chunk = b'{"errors":[' + b" " * 65524 + b"\n"
        try:
            for _ in range(2048):
                h.wfile.write(chunk)
                hostile.sent_bytes += len(chunk)
        except OSError:
            pass
        finally:
            h.close_connection = True
            hostile.done.set()
    return answer


@pytest.mark.parametrize("where", ["error body", "token response"])
def test_bodies_a_registry_sends_are_bounded(serve, where: str) -> None:
    if where == "error body":
        sender = registry = serve("127.0.0.2", endless(404))
    else:
        sender = serve("127.0.0.3", endless(200))
        registry = serve("127.0.0.2", bearer_to(f"{sender.url}/token"))
    with pytest.raises(RegistryError):
        make_client().resolve(parse_reference(f"{registry.host}/m:v1"))
    assert sender.done.wait(60)
    assert sender.sent_bytes < 32 << 20, f"the client read {sender.sent_bytes >> 20} MiB of a {where}"

