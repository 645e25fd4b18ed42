"""HTTP transport to registries, in layers: the allow-list, endpoints (mirrors), auth challenges, redirects,
retries, error codes.

Nothing here logs a header, a token or a query string. Every request for a reference passes the admin's
``allowedRegistries`` first. Credentials and tokens go only to the endpoint they belong to: a redirect or
an upload location on another host gets none, and must be https; registry credentials go to a token realm
on another host only over https (as Docker's token auth does). Where each connection may lead is
:mod:`modelcache.registry.egress`'s rule.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import urllib3

from modelcache.errors import Kind, RegistryError
from modelcache.registry import egress, slowbodies
from modelcache.registry.credentials import Credentials, CredentialStore
from modelcache.registry.egress import ANY_BUT_METADATA, AddressClass, EgressRefused
from modelcache.registry.hosts import Endpoint, HostsConfig
from modelcache.registry.mirrorhealth import MIRRORS, MirrorHealth

log = logging.getLogger(__name__)
ENVIRONMENT_ORIGINS = 256  # origins whose environment settings a session keeps
ORIGIN_KEPT_CHARS = 300  # ... when their host and port are no longer than this

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError, http.client.HTTPException, ConnectionError, TimeoutError,
)
# each matched where the last one ended, never searched for: parsing a challenge is linear in its length
_CHALLENGE_SEPARATORS = re.compile(r'[\s,]*')
_CHALLENGE_NAME = re.compile(r'(\w+)\s*=\s*')
_CHALLENGE_VALUE = re.compile(r'"((?:[^"\\]|\\.)*)"|([^,\s]*)')
_CHALLENGE_JUNK = re.compile(r'[^\s,]+')
MAX_CHALLENGE = 8 << 10
MAX_TOKEN_RESPONSE = 1 << 20
MAX_ERROR_BODY = 64 << 10
MAX_REDIRECTS = 5


def tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, and which setting fixes it (a handshake failure is never retried)."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return ("TLS certificate verification failed; install the registry's CA on the node or set "
                "insecureSkipVerify for this registry in the node settings")
    return (f"TLS handshake failed ({text[-160:]}); the registry may speak plain HTTP: set plainHTTP: true for "
            f"it under 'registries' in the node settings (or pass --plain-http)")


class Unreachable(RegistryError):
    """No connection could be made or kept (refused, timed out, reset), after every attempt; ``cause`` names
    the last failure."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message, kind=Kind.UNAVAILABLE)
        self.cause = cause


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient failures. A mirror gets one attempt, and
    ``mirror_connect_timeout`` to accept the connection: the next endpoint is tried at once."""

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 4.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    mirror_connect_timeout: float = 0.5
    min_bytes_per_second: float = slowbodies.FLOOR  # a blob body's floor speed, each read of it (see slowbodies)

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.max_delay)
        backoff: float = min(self.base_delay * (2 ** (attempt - 1)), self.max_delay)
        return backoff * (0.5 + random.random() / 2)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a ``WWW-Authenticate`` value into its scheme and parameters, in one pass (a value over
    MAX_CHALLENGE bytes is refused); a word that starts no ``name=value`` is skipped."""
    if len(header) > MAX_CHALLENGE:
        raise RegistryError(f"the registry's authentication challenge is {len(header)} bytes long (the limit is "
                            f"{MAX_CHALLENGE}); refusing it", kind=Kind.UNAUTHENTICATED, status=401)
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        separators = _CHALLENGE_SEPARATORS.match(rest, pos)
        assert separators is not None  # it matches the empty string
        pos = separators.end()
        name = _CHALLENGE_NAME.match(rest, pos)
        if name is None:
            junk = _CHALLENGE_JUNK.match(rest, pos)
            pos = junk.end() if junk else pos + 1
            continue
        value = _CHALLENGE_VALUE.match(rest, name.end())
        assert value is not None  # its unquoted form matches the empty string
        params[name.group(1).lower()] = value.group(1) if value.group(1) is not None else value.group(2)
        pos = value.end()
    return scheme.lower(), params


def _error_detail(response: requests.Response) -> tuple[str | None, str]:
    """The first OCI error code and message of a response body, if it has one (bodies over 64 KiB have none)."""
    try:
        body = json.loads(read_limited(response, MAX_ERROR_BODY, "error body"))
        first = (body.get("errors") or [{}])[0]
        return first.get("code"), str(first.get("message", ""))
    except (RegistryError, ValueError, AttributeError, TypeError, IndexError, requests.RequestException):
        return None, ""


def status_error(response: requests.Response, what: str) -> RegistryError:
    """A :class:`RegistryError` for an unsuccessful response."""
    status = response.status_code
    code, message = _error_detail(response)
    detail = f" ({code}: {message})" if code else ""
    if status == 401:
        kind = Kind.UNAUTHENTICATED
    elif status == 403:
        kind = Kind.PERMISSION_DENIED
    elif status == 404:
        kind = Kind.NOT_FOUND
    elif status in RETRY_STATUSES or status >= 500:
        kind = Kind.UNAVAILABLE
    else:
        kind = Kind.INVALID_ARGUMENT
    return RegistryError(f"{what}: registry answered HTTP {status}{detail}", kind=kind, status=status, code=code)


class Transport:
    """Sends requests for one registry name, handling the allow-list, mirrors, auth, redirects and retries.

    ``allowed_registries``: globs on ``host[:port]`` a reference's registry must match (empty: any registry).
    ``mirrors``: which mirrors are down (the process's record, shared by every transport, by default).
    """

    def __init__(self, hosts: HostsConfig | None = None, credentials: CredentialStore | None = None,
                 retry: RetryPolicy | None = None, user_agent: str = "ocimodel",
                 allowed_registries: Iterable[str] = (), mirrors: MirrorHealth = MIRRORS) -> None:
        self.hosts = hosts or HostsConfig()
        self.mirrors = mirrors
        self.allowed_registries = tuple(allowed_registries)
        self.credentials = credentials or CredentialStore()
        self.retry = retry or RetryPolicy()
        self._local = threading.local()
        self._tokens: dict[tuple[str, str], str] = {}
        self._basic_hosts: set[str] = set()
        self._lock = threading.Lock()
        self.user_agent = user_agent

    @property
    def session(self) -> requests.Session:
        """A session per thread (requests sessions are not thread-safe)."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = _Session()
            session.headers["User-Agent"] = self.user_agent
            adapter = egress.GuardedAdapter(pool_connections=4, pool_maxsize=8)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
        return session

    # -- auth -------------------------------------------------------------------------------------------
    def _auth_header(self, endpoint: Endpoint, scope: str) -> str | None:
        with self._lock:
            token = self._tokens.get((endpoint.host, scope))
            basic = endpoint.host in self._basic_hosts
        if token:
            return f"Bearer {token}"
        if basic:
            creds = self.credentials.lookup(endpoint.host)
            if creds and not creds.empty:
                return _basic(creds)
        return None

    def _authenticate(self, endpoint: Endpoint, scope: str, challenge: str, registry: str) -> None:
        """Answer a 401 challenge: remember Basic credentials or fetch a Bearer token."""
        scheme, params = parse_challenge(challenge)
        creds = self.credentials.lookup(endpoint.host)
        if scheme == "basic":
            if creds is None or creds.empty:
                raise RegistryError(f"{registry}: authentication required and no credentials are configured for "
                                    f"{endpoint.host}", kind=Kind.UNAUTHENTICATED, status=401)
            with self._lock:
                self._basic_hosts.add(endpoint.host)
            return
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryError(f"{registry}: unsupported authentication challenge scheme {scheme!r}",
                                kind=Kind.UNAUTHENTICATED, status=401)
        realm = params["realm"]
        self._check_realm(endpoint, realm, registry)
        where = egress.origin(realm)
        same = where == egress.origin(endpoint.url)
        lend = bool(creds and not creds.empty) and (same or where[0] == "https")
        query = {"service": params.get("service", "")} if params.get("service") else {}
        query["scope"] = scope
        label = f"{registry}: token request"
        if lend and creds and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": self.user_agent, "scope": scope, "service": params.get("service", "")}
            response = self._send(lambda: self._direct("POST", endpoint, realm, same, data=form), label)
        else:
            auth = (creds.username, creds.password) if lend and creds else None
            response = self._send(lambda: self._direct("GET", endpoint, f"{realm}?{urlencode(query)}", same,
                                                       auth=auth), label)
        with closing_response(response):
            if response.is_redirect:
                raise EgressRefused(f"{label}: the token service redirected; token requests are not redirected")
            if response.status_code != 200:
                withheld = " (credentials withheld: plain-HTTP token service on another host)" \
                    if creds and not creds.empty and not lend else ""
                error = status_error(response, label + withheld)
                if error.kind is Kind.NOT_FOUND:
                    error.kind = Kind.UNAUTHENTICATED
                raise error
            raw = read_limited(response, MAX_TOKEN_RESPONSE, f"{registry}: token response")
        try:
            body = json.loads(raw)
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise RegistryError(f"{registry}: token service returned no token", kind=Kind.UNAUTHENTICATED)
        with self._lock:
            self._tokens[(endpoint.host, scope)] = token

    def _check_realm(self, endpoint: Endpoint, realm: str, registry: str) -> None:
        """A token realm must be an http(s) URL, and https unless the registry itself is reached over plain HTTP
        (its address is checked when the token request connects)."""
        scheme, host, port = egress.origin(realm)
        if scheme not in ("http", "https") or not host:
            raise RegistryError(f"{registry}: token realm is not an http(s) URL", kind=Kind.UNAUTHENTICATED)
        if scheme == "http" and egress.origin(endpoint.url)[0] != "http":
            raise EgressRefused(f"{registry}: its token realm on {host}:{port} is plain HTTP; a realm must be https "
                                f"unless the registry is configured for plain HTTP")

    def _elsewhere(self, endpoint: Endpoint) -> frozenset[AddressClass]:
        """Where a URL on another host named by ``endpoint`` (token realm, redirect, upload location) may lead:
        public addresses, and addresses of the class ``endpoint`` was reached at (a loopback registry may
        name a loopback token service; a public one may name nothing inside the node's network)."""
        own = egress.peer_class(endpoint.url)
        return frozenset({AddressClass.GLOBAL} | ({own} if own else set()))

    def _direct(self, method: str, endpoint: Endpoint, url: str, same: bool, *,
                headers: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
                data: bytes | IO[bytes] | Mapping[str, str] | None = None,
                auth: tuple[str, str] | None = None) -> requests.Response:
        """One request to ``url`` without following redirects, under the address rule for it: ``same`` says
        ``url`` is on ``endpoint``'s own origin. TLS is verified as configured for ``endpoint`` on its host
        name (any port), always anywhere else. A mirror has ``mirror_connect_timeout`` to accept."""
        own_host = egress.origin(url)[1] == egress.origin(endpoint.url)[1]
        connect = self.retry.mirror_connect_timeout if endpoint.is_mirror and same else self.retry.connect_timeout
        with egress.permitting(ANY_BUT_METADATA if same else self._elsewhere(endpoint)):
            return self.session.request(method, url, params=params, headers=headers, data=data, auth=auth,
                                        stream=True, timeout=(connect, self.retry.read_timeout),
                                        allow_redirects=False, verify=endpoint.verify_tls if own_host else True)

    def used_auth(self, host: str) -> bool:
        """True when requests to ``host`` needed credentials or a token."""
        with self._lock:
            return host in self._basic_hosts or any(h == host for h, _ in self._tokens)

    # -- sending ----------------------------------------------------------------------------------------
    def _send(self, call: Callable[[], requests.Response], what: str, attempts: int = 0) -> requests.Response:
        """Run ``call`` with retries on connection errors and transient statuses, ``attempts`` times in all
        (0: the retry policy's)."""
        attempts = attempts or self.retry.attempts
        attempt, stale = 0, False
        while True:
            attempt += 1
            try:
                response = call()
            except requests.exceptions.SSLError as exc:
                raise RegistryError(f"{what}: {tls_failure(exc)}", kind=Kind.UNAVAILABLE) from None
            except STREAM_ERRORS as exc:
                if not stale and _dropped_unanswered(exc):
                    stale, attempt = True, attempt - 1  # not an attempt: a kept-alive connection the server
                    continue                            # closed as it was reused; once more, on a new one
                if attempt >= attempts:
                    cause = type(exc).__name__
                    raise Unreachable(f"{what}: registry unreachable after {attempt} attempt"
                                      f"{'s' if attempt > 1 else ''} ({cause})", cause) from None
                time.sleep(self.retry.delay(attempt))
                continue
            if response.status_code in RETRY_STATUSES and attempt < attempts:
                retry_after = response.headers.get("Retry-After")
                response.close()
                time.sleep(self.retry.delay(attempt, retry_after))
                continue
            return response

    def request(self, method: str, registry: str, upstream_host: str, path: str, *, scope: str, what: str,
                headers: Mapping[str, str] | None = None, for_push: bool = False,
                body: bytes | IO[bytes] | None = None, params: Mapping[str, str] | None = None,
                ok: Callable[[int], bool] = lambda s: 200 <= s < 300, skip_endpoints: int = 0) -> requests.Response:
        """Send ``method path`` to the first endpoint that answers well; raise a :class:`RegistryError`.

        ``path`` is below the endpoint, or a URL (an upload location). The response is streamed: close it.
        Mirrors are tried first for reads, once each; any failure at a mirror falls through to the next
        endpoint, and a mirror that cannot be reached is skipped while :attr:`mirrors` holds it down.
        ``skip_endpoints`` passes over the first ones (a caller that found their answer wrong).
        A registry outside ``allowed_registries`` is refused before anything is sent.
        """
        if not egress.registry_allowed(registry, self.allowed_registries):
            raise EgressRefused(f"registry {registry} is not in the node's allowedRegistries setting; "
                                f"ask the cluster admin to add it")
        endpoints = self.hosts.endpoints(registry, upstream_host, for_push=for_push)[skip_endpoints:]
        last_error: RegistryError | None = None
        for endpoint in endpoints:
            if endpoint.is_mirror and not self.mirrors.usable(endpoint.url):
                continue
            query = dict(params or {})
            if endpoint.is_mirror:
                query["ns"] = registry
            url = f"{endpoint.url}{path}" if path.startswith("/") else path
            try:
                response = self._request_endpoint(method, endpoint, url, query, scope, what, registry,
                                                  headers or {}, body)
            except RegistryError as exc:
                if not endpoint.is_mirror:
                    raise
                if isinstance(exc, Unreachable):
                    self.mirrors.failed(endpoint.url, exc.cause)
                log.info("mirror %s failed for %s (%s); trying next endpoint", endpoint.host, what, exc.kind.value)
                last_error = exc
                continue
            if endpoint.is_mirror:
                self.mirrors.answered(endpoint.url)
            if ok(response.status_code):
                return response
            error = status_error(response, f"{registry}: {what}")
            response.close()
            if not endpoint.is_mirror:
                raise error
            log.info("mirror %s answered %s for %s; trying next endpoint", endpoint.host, error.status, what)
            last_error = error
        assert last_error is not None
        raise last_error

    def _request_endpoint(self, method: str, endpoint: Endpoint, url: str, query: Mapping[str, str], scope: str,
                          what: str, registry: str, headers: Mapping[str, str],
                          body: bytes | IO[bytes] | None) -> requests.Response:
        rejected = 0  # 401s answered so far; the second asks the credential sources again
        label = f"{registry}: {what}"
        while True:
            auth = self._auth_header(endpoint, scope)

            def call(a: str | None = auth) -> requests.Response:
                return self._follow(method, endpoint, url, query, headers, a, body, label)

            response = self._send(call, label, attempts=1 if endpoint.is_mirror else 0)
            if response.status_code != 401 or egress.origin(response.url) != egress.origin(endpoint.url):
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            response.close()
            if rejected >= 2 or not challenge:
                creds = self.credentials.lookup(endpoint.host)
                reason = "credentials were rejected" if creds and not creds.empty else "authentication required"
                raise RegistryError(f"{registry}: {what}: {reason} by {endpoint.host}",
                                    kind=Kind.UNAUTHENTICATED, status=401)
            if rejected:  # what we sent was refused again: expired helper answers or a rotated Secret
                self.credentials.forget(endpoint.host)
            self._reauthenticate(endpoint, scope, challenge, registry)
            rejected += 1

    def _follow(self, method: str, endpoint: Endpoint, url: str, query: Mapping[str, str],
                headers: Mapping[str, str], auth: str | None, body: bytes | IO[bytes] | None,
                label: str) -> requests.Response:
        """Send a request and follow up to MAX_REDIRECTS redirects. ``auth`` goes only to ``endpoint``'s own
        origin; any other URL must be https and gets no Authorization."""
        home = egress.origin(endpoint.url)
        for hop in range(MAX_REDIRECTS + 1):
            where = egress.origin(url)
            same = where == home
            if not same and where[0] != "https":
                how = "redirected" if hop else "sent"
                raise EgressRefused(f"{label}: {how} to plain HTTP on another host ({where[1]}:{where[2]}); "
                                    f"only https is followed off the registry's own host")
            sent = dict(headers)
            if same and auth:
                sent["Authorization"] = auth
            if body is not None and hasattr(body, "seek"):
                body.seek(0)
            response = self._direct(method, endpoint, url, same, headers=sent, params=query or None, data=body)
            if not response.is_redirect:
                return response
            response.close()
            url, query = urljoin(response.url, response.headers["Location"]), {}
            if (response.status_code == 303 and method != "HEAD") or \
                    (response.status_code in (301, 302) and method == "POST"):  # as browsers and requests do
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
        raise RegistryError(f"{label}: more than {MAX_REDIRECTS} redirects", kind=Kind.UNAVAILABLE)

    def _reauthenticate(self, endpoint: Endpoint, scope: str, challenge: str, registry: str) -> None:
        """Drop the token we hold for ``scope`` (it may have expired) and answer ``challenge``; when the token
        service refuses our credentials, ask their sources again once."""
        with self._lock:
            self._tokens.pop((endpoint.host, scope), None)
        try:
            self._authenticate(endpoint, scope, challenge, registry)
        except RegistryError as exc:
            if exc.kind is not Kind.UNAUTHENTICATED:
                raise
            self.credentials.forget(endpoint.host)
            self._authenticate(endpoint, scope, challenge, registry)


def _basic(creds: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def body_reader(response: requests.Response, policy: RetryPolicy, what: str,
                expected: int | None = None) -> Callable[[bytearray], int]:
    """``readinto`` of a streamed response's body, filling the whole buffer per call (short only at the
    end), each call bounded by ``policy``'s floor speed for the bytes it may still bring (``expected`` at
    most, where the caller knows; :mod:`modelcache.registry.slowbodies`). http.client's
    own response where urllib3 wraps one: urllib3's ``readinto`` reads into a new bytes object and copies it,
    a copy and an allocation per read at line rate. Either way the body comes as sent (blob bytes are never
    content-decoded) and its caller verifies it."""
    inner = _http_client_response(response)
    readinto: Callable[[bytearray], int]
    if inner is not None and not getattr(response.raw, "_fp_bytes_read", 0):
        readinto = inner.readinto
    else:
        raw = response.raw

        def fill(buffer: bytearray) -> int:
            view, got = memoryview(buffer), 0
            while got < len(buffer) and (n := raw.readinto(view[got:])):
                got += n
            return got
        readinto = fill
    sock = _socket_of(response)
    if sock is None:
        log.warning("%s: no socket under the response; its body's speed is not bounded", what)
        return readinto
    declared = getattr(inner, "length", None)  # as http.client parsed Content-Length (None: unknown)
    left = [n for n in (declared if isinstance(declared, int) else None, expected) if n is not None]
    return slowbodies.guarded(readinto, sock, min(left) if left else None, floor=policy.min_bytes_per_second,
                              what=what)


def _socket_of(response: requests.Response) -> socket.socket | None:
    """The socket a response's body is read from (where http.client's response is under urllib3's)."""
    inner = _http_client_response(response)
    sock = getattr(getattr(getattr(inner, "fp", None), "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _http_client_response(response: requests.Response) -> http.client.HTTPResponse | None:
    """The http.client response under urllib3's, where there is one."""
    inner = getattr(response.raw, "_fp", None)
    return inner if isinstance(inner, http.client.HTTPResponse) else None


def _dropped_unanswered(exc: BaseException) -> bool:
    """True for a kept-alive connection closed or reset before any answer came (what reusing one that the
    server has just closed looks like); never for a new connection, a refused one or a time-out."""
    if not isinstance(exc, requests.exceptions.ConnectionError) or not exc.args or not egress.took_kept_alive():
        return False
    protocol = exc.args[0]
    return isinstance(protocol, urllib3.exceptions.ProtocolError) and len(protocol.args) > 1 and isinstance(
        protocol.args[1], (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError))


class _Session(requests.Session):
    """A session that never follows redirects itself (:meth:`Transport._follow` does, with its checks). Even
    with ``allow_redirects=False``, requests reads the whole body of every 3xx that names a Location, with no
    limit and decompressed, to prepare the next hop: a hostile registry's gzip bomb in a redirect."""

    def __init__(self) -> None:
        super().__init__()
        self._environment: dict[tuple[Any, ...], Any] = {}

    def get_redirect_target(self, resp: requests.Response) -> None:
        return None

    def merge_environment_settings(self, url: str | bytes | None, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> Any:
        """requests' merge of proxy and CA settings from the environment, worked out once per origin: it scans
        every environment variable on each request (twice), and a pod's environment holds one set per Service
        of its namespace (ms per request where there are hundreds). The environment does not change."""
        text = url.decode() if isinstance(url, bytes) else url or ""
        parts = urlsplit(text)
        key = (parts.scheme, parts.netloc, tuple(sorted((proxies or {}).items())), stream, verify, cert)
        settings = self._environment.get(key)
        if settings is None:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if len(parts.netloc) <= ORIGIN_KEPT_CHARS:  # a registry's odd long names are not kept
                if len(self._environment) >= ENVIRONMENT_ORIGINS:  # redirects to ever new hosts: start over
                    self._environment.clear()
                self._environment[key] = settings
        return settings.copy()


@contextmanager
def closing_response(response: requests.Response) -> Iterator[requests.Response]:
    """Close ``response`` on exit, returning its connection to the pool when possible: when its body was
    read to the end through :func:`body_reader` (which requests does not see, so its own ``close`` would
    drop the connection: a new TCP and TLS handshake for every range a lazy read or a ranged piece asks)."""
    try:
        yield response
    finally:
        inner = _http_client_response(response)
        if inner is not None and _read_to_its_end(inner):
            response.raw.release_conn()
        else:
            response.close()


def _read_to_its_end(inner: http.client.HTTPResponse) -> bool:
    """True when every byte of ``inner``'s Content-Length was read and the connection may carry another
    request. A chunked body, one cut short (http.client closes those too) or ``Connection: close`` is not."""
    return inner.isclosed() and not inner.will_close and not inner.chunked and inner.length == 0


def read_limited(response: requests.Response, limit: int, what: str) -> bytes:
    """Read a small body, refusing more than ``limit`` bytes (manifests, configs, tokens, error bodies), in
    at most the socket's read timeout plus ``limit`` bytes' time at the floor speed."""
    declared = response.headers.get("Content-Length", "")
    if declared.isascii() and declared.isdigit() and len(declared) <= 19 and int(declared) > limit:
        raise RegistryError(f"{what}: body of {declared} bytes exceeds the {limit}-byte limit",
                            kind=Kind.UNSAFE_CONTENT)
    chunks: list[bytes] = []

    def read() -> None:
        total = 0
        for chunk in response.iter_content(65536):
            total += len(chunk)
            if total > limit:
                raise RegistryError(f"{what}: body exceeds the {limit}-byte limit", kind=Kind.UNSAFE_CONTENT)
            chunks.append(chunk)
    try:
        sock = _socket_of(response)
        if sock is None:
            read()
        else:
            slowbodies.bounded(read, sock, slowbodies.grace_of(sock) + limit / slowbodies.FLOOR, what,
                               slowbodies.FLOOR)
    except STREAM_ERRORS as exc:
        raise RegistryError(f"{what}: connection failed while reading ({type(exc).__name__})",
                            kind=Kind.UNAVAILABLE) from None
    return b"".join(chunks)


def scope_for(repository: str, push: bool = False) -> str:
    """The token scope for ``repository``."""
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"


