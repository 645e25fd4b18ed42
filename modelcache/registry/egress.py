"""Where registry traffic may go: the admin's registry allow-list, and the address rule every connection obeys.

A pod author picks the registry, so the registry picks token realms, redirect targets and upload locations.
Each connection the transport opens resolves its host once, checks every address against the classes the
current request permits (:func:`permitting`) and connects to a checked address, so a name that changes its
answer between a check and a connect (DNS rebinding) gains nothing; a kept-alive connection taken from a
pool is checked again against the rule of the request that takes it. Cloud metadata addresses are never
permitted. Connections through an HTTP(S) proxy from the environment are the proxy's to resolve: the rule
does not reach them.
"""

from __future__ import annotations

import enum
import fnmatch
import glob
import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, LocationParseError, NameResolutionError, NewConnectionError
from urllib3.response import HTTPResponse
from urllib3.util import parse_url

from modelcache.errors import Kind, RegistryError
from modelcache.registry import slowbodies
from modelcache.registry.reference import normalise_registry

if TYPE_CHECKING:
    from urllib3._base_connection import BaseHTTPConnection

# instance metadata and credential services of the clouds (AWS IMDS and ECS/EKS credential agents, Alibaba,
# Azure's wireserver, Oracle's legacy address); GCP and Azure IMDS answer on 169.254.169.254 too
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.170.23", "fd00:ec2::254", "fd00:ec2::23", "100.100.100.200",
    "168.63.129.16", "192.0.0.192"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressClass(enum.Enum):
    """How far inside the node's network an address lies."""

    GLOBAL = "public"
    PRIVATE = "private"
    LINK_LOCAL = "link-local"
    LOOPBACK = "loopback"
    METADATA = "cloud metadata"


ANY_BUT_METADATA = frozenset(AddressClass) - {AddressClass.METADATA}
UNSAFE_URL_CHARACTER = re.compile(r"[\\\x00-\x1f\x7f]|\s")  # \s: what str.isspace() calls whitespace


class EgressRefused(RegistryError):
    """A connection or URL the egress rules do not allow."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind=Kind.REFUSED)


def _spelled(name: str) -> str:
    """``name`` in the one spelling of :func:`modelcache.registry.reference.normalise_registry` (lower case when it is
    no registry host, so that it matches nothing a reference can name)."""
    try:
        return normalise_registry(name.strip())
    except ValueError:
        return name.strip().lower()


def registry_pattern(pattern: str) -> str:
    """An ``allowedRegistries`` entry as a glob on normalised names: a literal ``host[:port]`` is spelled as
    references are and matched literally (an IPv6 host's brackets are no glob class); a glob is lower-cased
    and loses a ``:443``."""
    if any(c in pattern for c in "*?"):
        return pattern.strip().lower().removesuffix(":443")
    return glob.escape(_spelled(pattern))


def registry_allowed(registry: str, patterns: Iterable[str]) -> bool:
    """True when ``registry`` matches one of the ``allowedRegistries`` globs ``patterns`` (none: any registry)."""
    globs = [registry_pattern(p) for p in patterns]
    name = _spelled(registry)
    return not globs or any(fnmatch.fnmatchcase(name, g) for g in globs)


def classify(address: str) -> AddressClass:
    """The class of an IP address (IPv4-mapped and NAT64 IPv6 addresses count as the IPv4 they carry)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in METADATA_ADDRESSES:
        return AddressClass.METADATA
    if ip.is_loopback or ip.is_unspecified:  # 0.0.0.0 and :: reach the node itself
        return AddressClass.LOOPBACK
    if ip.is_link_local:
        return AddressClass.LINK_LOCAL
    return AddressClass.GLOBAL if ip.is_global else AddressClass.PRIVATE


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of a URL as requests will send it (the scheme's default port filled in).
    Refuses a URL that parsers read differently (a backslash, whitespace or a control character) or that
    carries userinfo, so that the origin compared is the one connected to."""
    if UNSAFE_URL_CHARACTER.search(url):
        raise EgressRefused(f"URL {url[:200]!r} has a backslash, whitespace or a control character")
    prepared = requests.PreparedRequest()
    try:
        prepared.prepare_url(url, None)
        parts = parse_url(prepared.url or "")
    except (requests.RequestException, LocationParseError) as exc:
        raise EgressRefused(f"URL {url[:200]!r} is not a valid URL ({exc})") from None
    if parts.auth is not None:
        raise EgressRefused(f"URL {url[:200]!r} carries userinfo")
    scheme = (parts.scheme or "").lower()
    host = (parts.host or "").lower().rstrip(".").removeprefix("[").removesuffix("]")
    return scheme, host, parts.port or (443 if scheme == "https" else 80)


_current = threading.local()  # .permitted: classes the request in flight may connect to; .peers: see peer_class


@contextmanager
def permitting(classes: frozenset[AddressClass]) -> Iterator[None]:
    """Connections opened by this thread inside the block may reach only addresses of ``classes``."""
    previous = _permitted()
    _current.permitted = classes - {AddressClass.METADATA}
    try:
        yield
    finally:
        _current.permitted = previous


def _permitted() -> frozenset[AddressClass]:
    permitted: frozenset[AddressClass] = getattr(_current, "permitted", ANY_BUT_METADATA)
    return permitted


def peer_class(url: str) -> AddressClass | None:
    """The class of the address this thread last connected to for ``url``'s host and port (None: never)."""
    _, host, port = origin(url)
    peers: dict[tuple[str, int], AddressClass] = getattr(_current, "peers", {})
    return peers.get((host, port))


def _connect(conn: HTTPConnection) -> socket.socket:
    """Resolve ``conn``'s host, refuse it unless every address is permitted, connect to a checked address."""
    permitted = _permitted()
    try:
        infos = socket.getaddrinfo(conn.host, conn.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise NameResolutionError(conn.host, conn, exc) from exc
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        found = classify(address)
        if found not in permitted:
            raise EgressRefused(f"{conn.host} resolves to a {found.value} address ({address}), which this request "
                                f"may not reach (allowed: {', '.join(sorted(c.value for c in permitted))})")
    failure: OSError | None = None
    for address in addresses:
        try:
            sock = urllib3.util.connection.create_connection(
                (address, conn.port), conn.timeout, source_address=conn.source_address,
                socket_options=conn.socket_options)
        except TimeoutError as exc:
            raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out") from exc
        except OSError as exc:
            failure = exc
            continue
        if not hasattr(_current, "peers"):
            _current.peers = {}
        _current.peers[(conn.host.lower(), conn.port)] = classify(address)
        return sock
    raise NewConnectionError(conn, f"Failed to establish a new connection: {failure}")


def _headers_in_time(conn: BaseHTTPConnection, getresponse: Callable[[], HTTPResponse]) -> HTTPResponse:
    """An answer's status and headers, read within the socket's read timeout plus HEADER_BYTES at the floor
    speed (:mod:`modelcache.registry.slowbodies`): a registry trickling headers is cut."""
    sock = getattr(conn, "sock", None)
    if not isinstance(sock, socket.socket):
        return getresponse()
    seconds = slowbodies.grace_of(sock) + slowbodies.HEADER_BYTES / slowbodies.FLOOR
    answer = slowbodies.bounded(getresponse, sock, seconds, f"{conn.host}: answer headers", slowbodies.FLOOR)
    assert isinstance(answer, HTTPResponse)
    return answer


class _Connection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _connect(self)

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        return _headers_in_time(self, super().getresponse)


class _TLSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _connect(self)

    def getresponse(self) -> HTTPResponse:  # type: ignore[override]
        return _headers_in_time(self, super().getresponse)


_taken = threading.local()


def took_kept_alive() -> bool:
    """True when the last connection this thread took from a pool was a kept-alive one, not opened anew."""
    return bool(getattr(_taken, "kept_alive", False))


def _rechecked(conn: BaseHTTPConnection) -> BaseHTTPConnection:
    """A pooled connection, closed (so that it is opened again, checked) when the request taking it may not
    reach the address it is connected to."""
    sock = getattr(conn, "sock", None)
    _taken.kept_alive = False
    if sock is not None:
        try:
            address = str(sock.getpeername()[0])
        except OSError:
            return conn
        if classify(address) not in _permitted():
            conn.close()
        else:
            _taken.kept_alive = True
    return conn


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection

    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        return _rechecked(super()._get_conn(timeout))


class _TLSPool(HTTPSConnectionPool):
    ConnectionCls = _TLSConnection

    def _get_conn(self, timeout: float | None = None) -> BaseHTTPConnection:
        return _rechecked(super()._get_conn(timeout))


class GuardedAdapter(requests.adapters.HTTPAdapter):
    """A requests adapter whose direct connections obey :func:`permitting`."""

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        """Pools whose connections check addresses before connecting."""
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _Pool, "https": _TLSPool}
