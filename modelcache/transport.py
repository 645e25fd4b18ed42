"""HTTP transport to registries, in layers: endpoints (mirrors), auth challenges, retries, error codes.

Nothing here logs a header, a token or a query string.
"""

from __future__ import annotations

import base64
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO
from urllib.parse import urlencode, urlsplit

import requests
import urllib3

from modelcache.credentials import Credentials, CredentialStore
from modelcache.errors import Kind, RegistryError
from modelcache.hosts import Endpoint, HostsConfig

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
STREAM_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError, ConnectionError, TimeoutError,
)
_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))')
MAX_TOKEN_RESPONSE = 1 << 20


def tls_failure(exc: BaseException) -> str:
    """Why a TLS handshake failed, and which setting fixes it (a handshake failure is never retried)."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return ("TLS certificate verification failed; install the registry's CA on the node or set "
                "insecureSkipVerify for this registry in the node settings")
    return (f"TLS handshake failed ({text[-160:]}); the registry may speak plain HTTP: set plainHTTP: true for "
            f"it under 'registries' in the node settings (or pass --plain-http)")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient failures."""

    attempts: int = 5
    base_delay: float = 0.25
    max_delay: float = 4.0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        if retry_after and retry_after.isdigit():
            return min(float(retry_after), self.max_delay)
        backoff: float = min(self.base_delay * (2 ** (attempt - 1)), self.max_delay)
        return backoff * (0.5 + random.random() / 2)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a ``WWW-Authenticate`` value into its scheme and parameters."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def _error_detail(response: requests.Response) -> tuple[str | None, str]:
    """The first OCI error code and message of a response body, if it has one."""
    try:
        body = response.json() if len(response.content) < 65536 else {}
        first = (body.get("errors") or [{}])[0]
        return first.get("code"), str(first.get("message", ""))
    except (ValueError, AttributeError, TypeError, IndexError, requests.RequestException):
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
    """Sends requests for one registry name, handling mirrors, auth and retries."""

    def __init__(self, hosts: HostsConfig | None = None, credentials: CredentialStore | None = None,
                 retry: RetryPolicy | None = None, user_agent: str = "ocimodel") -> None:
        self.hosts = hosts or HostsConfig()
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
            session = requests.Session()
            session.headers["User-Agent"] = self.user_agent
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=8)
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
        if urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryError(f"{registry}: token realm is not an http(s) URL", kind=Kind.UNAUTHENTICATED)
        query = {"service": params.get("service", "")} if params.get("service") else {}
        query["scope"] = scope
        auth = None
        if creds and creds.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": self.user_agent, "scope": scope, "service": params.get("service", "")}
            response = self._send(lambda: self.session.post(realm, data=form, timeout=self._timeouts(),
                                                            verify=endpoint.verify_tls), "token request")
        else:
            if creds and not creds.empty:
                auth = (creds.username, creds.password)
            response = self._send(lambda: self.session.get(f"{realm}?{urlencode(query)}", auth=auth,
                                                           timeout=self._timeouts(), verify=endpoint.verify_tls),
                                  "token request")
        if response.status_code != 200:
            error = status_error(response, f"{registry}: token request")
            if error.kind is Kind.NOT_FOUND:
                error.kind = Kind.UNAUTHENTICATED
            raise error
        try:
            body = response.json() if len(response.content) <= MAX_TOKEN_RESPONSE else {}
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token or not isinstance(token, str):
            raise RegistryError(f"{registry}: token service returned no token", kind=Kind.UNAUTHENTICATED)
        with self._lock:
            self._tokens[(endpoint.host, scope)] = token

    def used_auth(self, host: str) -> bool:
        """True when requests to ``host`` needed credentials or a token."""
        with self._lock:
            return host in self._basic_hosts or any(h == host for h, _ in self._tokens)

    # -- sending ----------------------------------------------------------------------------------------
    def _timeouts(self) -> tuple[float, float]:
        return (self.retry.connect_timeout, self.retry.read_timeout)

    def _send(self, call: Callable[[], requests.Response], what: str) -> requests.Response:
        """Run ``call`` with retries on connection errors and transient statuses."""
        attempt = 0
        while True:
            attempt += 1
            try:
                response = call()
            except requests.exceptions.SSLError as exc:
                raise RegistryError(f"{what}: {tls_failure(exc)}", kind=Kind.UNAVAILABLE) from None
            except STREAM_ERRORS as exc:
                if attempt >= self.retry.attempts:
                    raise RegistryError(f"{what}: registry unreachable after {attempt} attempts "
                                        f"({type(exc).__name__})", kind=Kind.UNAVAILABLE) from None
                time.sleep(self.retry.delay(attempt))
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retry.attempts:
                retry_after = response.headers.get("Retry-After")
                response.close()
                time.sleep(self.retry.delay(attempt, retry_after))
                continue
            return response

    def request(self, method: str, registry: str, upstream_host: str, path: str, *, scope: str, what: str,
                headers: Mapping[str, str] | None = None, stream: bool = False, for_push: bool = False,
                body: bytes | IO[bytes] | None = None, params: Mapping[str, str] | None = None,
                ok: Callable[[int], bool] = lambda s: 200 <= s < 300, skip_endpoints: int = 0) -> requests.Response:
        """Send ``method path`` to the first endpoint that answers well; raise a :class:`RegistryError`.

        Mirrors are tried first for reads; any failure at a mirror falls through to the next endpoint.
        ``skip_endpoints`` passes over the first ones (a caller that found their answer wrong).
        """
        endpoints = self.hosts.endpoints(registry, upstream_host, for_push=for_push)[skip_endpoints:]
        last_error: RegistryError | None = None
        for endpoint in endpoints:
            query = dict(params or {})
            if endpoint.is_mirror:
                query["ns"] = registry
            url = f"{endpoint.url}{path}" if path.startswith("/") else path
            try:
                response = self._request_endpoint(method, endpoint, url, query, scope, what, registry,
                                                  headers or {}, stream, body)
            except RegistryError as exc:
                if not endpoint.is_mirror:
                    raise
                log.info("mirror %s failed for %s (%s); trying next endpoint", endpoint.host, what, exc.kind.value)
                last_error = exc
                continue
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
                          what: str, registry: str, headers: Mapping[str, str], stream: bool,
                          body: bytes | IO[bytes] | None) -> requests.Response:
        rejected = 0  # 401s answered so far; the second asks the credential sources again
        while True:
            sent_headers = dict(headers)
            auth = self._auth_header(endpoint, scope)
            if auth:
                sent_headers["Authorization"] = auth
            if body is not None and hasattr(body, "seek"):
                body.seek(0)

            def call(h: dict[str, str] = sent_headers) -> requests.Response:
                return self.session.request(method, url, params=query or None, headers=h, data=body,
                                            stream=stream, timeout=self._timeouts(), verify=endpoint.verify_tls,
                                            allow_redirects=True)

            response = self._send(call, f"{registry}: {what}")
            if response.status_code != 401:
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


@contextmanager
def closing_response(response: requests.Response) -> Iterator[requests.Response]:
    """Close ``response`` on exit, returning its connection to the pool when possible."""
    try:
        yield response
    finally:
        response.close()


def read_limited(response: requests.Response, limit: int, what: str) -> bytes:
    """Read a small body, refusing more than ``limit`` bytes (manifests, configs, tokens)."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RegistryError(f"{what}: body of {declared} bytes exceeds the {limit}-byte limit",
                            kind=Kind.UNSAFE_CONTENT)
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in response.iter_content(65536):
            total += len(chunk)
            if total > limit:
                raise RegistryError(f"{what}: body exceeds the {limit}-byte limit", kind=Kind.UNSAFE_CONTENT)
            chunks.append(chunk)
    except STREAM_ERRORS as exc:
        raise RegistryError(f"{what}: connection failed while reading ({type(exc).__name__})",
                            kind=Kind.UNAVAILABLE) from None
    return b"".join(chunks)


def scope_for(repository: str, push: bool = False) -> str:
    """The token scope for ``repository``."""
    return f"repository:{repository}:{'pull,push' if push else 'pull'}"


