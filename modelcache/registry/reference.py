"""Parsing of OCI references (``registry/ns/name[:tag][@digest]``) with Docker's normalisation rules.

Every registry name has one spelling (:func:`normalise_registry`), so that whatever compares names (policy
rules, credentials, caches, allow-lists) cannot be dodged by writing the same registry differently: host
names are lower-cased; the port is written as a plain number and ``:443`` (HTTPS's own) is dropped;
``index.docker.io`` and ``registry-1.docker.io`` are ``docker.io`` (``docker.io/x`` is
``docker.io/library/x``); an IPv4 address in any form the C resolver accepts (``127.1``, ``0x7f.0.0.1``,
``2130706433``) is written as a dotted quad; an IPv6 address is written compressed in lower case in brackets,
and an IPv4-mapped one (``[::ffff:127.0.0.1]``) as its IPv4 address. Refused rather than normalised: a
trailing dot (``localhost.``), a port 0 or above 65535, an all-numeric name that is no IPv4 address, and
brackets around anything but an IPv6 address. ``:80`` is kept (the scheme is not known here).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from modelcache.digest import Digest
from modelcache.errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
DOCKER_HUB_ALIASES = frozenset({DOCKER_HUB, "index.docker.io", DOCKER_HUB_ENDPOINT})
DEFAULT_PORT = 443
MAX_REFERENCE_LENGTH = 4096

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_HOST = re.compile(r"^[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*$")
_NUMERIC_LABEL = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::(?P<port>[0-9]{1,5}))?$")


def normalise_registry(name: str) -> str:
    """The one spelling of registry ``host[:port]`` (see the module's documentation); raise ValueError
    when ``name`` is not a registry host."""
    match = _HOST_PORT.match(name)
    if match is None:
        raise ValueError(f"invalid registry host {name!r}")
    host, port = match["host"], int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"invalid port in registry host {name!r}")
    if host.startswith("["):
        try:
            address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"invalid IPv6 address in registry host {name!r}") from None
        host = str(address.ipv4_mapped) if address.ipv4_mapped else f"[{address.compressed}]"
    elif not _HOST.match(host):
        raise ValueError(f"invalid registry host {name!r}")
    elif all(_NUMERIC_LABEL.match(label) for label in host.split(".")):
        try:  # what the resolver would connect to: inet_aton's forms (octal, hex, fewer parts)
            host = socket.inet_ntoa(socket.inet_aton(host))
        except OSError:
            raise ValueError(f"registry host {name!r} is numeric but not an IPv4 address") from None
    else:
        host = host.lower()
    if port == DEFAULT_PORT:
        port = None
    if host in DOCKER_HUB_ALIASES and port is None:
        return DOCKER_HUB
    return host if port is None else f"{host}:{port}"


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``tag`` and ``digest`` may both be set; the digest wins when resolving."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def endpoint_host(self) -> str:
        """The host to talk to for the upstream registry (Docker Hub's API lives on another name)."""
        return DOCKER_HUB_ENDPOINT if self.registry == DOCKER_HUB else self.registry

    @property
    def selector(self) -> str:
        """What goes after ``/manifests/``: the digest when known, else the tag (``latest`` by default)."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or "latest"

    def with_digest(self, digest: Digest) -> Reference:
        """The same repository pinned to ``digest`` (the tag is kept for display)."""
        return Reference(self.registry, self.repository, self.tag, digest)

    def by_digest(self, digest: Digest) -> Reference:
        """``digest`` in the same repository, without a tag (pushing to it never moves a tag)."""
        return Reference(self.registry, self.repository, None, digest)

    def with_tag(self, tag: str) -> Reference:
        """Tag ``tag`` in the same repository."""
        return Reference(self.registry, self.repository, tag, None)

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse ``text`` into a :class:`Reference`; raise :class:`InvalidReference` with a reason."""
    if not text or len(text) > MAX_REFERENCE_LENGTH:
        raise InvalidReference(f"reference must be 1..{MAX_REFERENCE_LENGTH} characters")
    if text != text.strip() or any(c.isspace() for c in text):
        raise InvalidReference(f"reference {text!r} contains white space")
    remainder = text
    digest: Digest | None = None
    if "@" in remainder:
        remainder, _, digest_text = remainder.partition("@")
        try:
            digest = Digest.parse(digest_text)
        except ValueError as exc:
            raise InvalidReference(f"reference {text!r}: {exc}") from None
    tag: str | None = None
    slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > slash:
        remainder, tag = remainder[:colon], remainder[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidReference(f"reference {text!r}: invalid tag {tag!r}")
    first, sep, rest = remainder.partition("/")
    if sep and ("." in first or ":" in first or first.lower() == "localhost" or first.startswith("[")):
        try:
            registry, path = normalise_registry(first), rest
        except ValueError as exc:
            raise InvalidReference(f"reference {text!r}: {exc}") from None
    else:
        registry, path = DOCKER_HUB, remainder
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    components = path.split("/")
    if not path or not all(_COMPONENT.match(c) for c in components):
        raise InvalidReference(
            f"reference {text!r}: repository {path!r} must be lower-case path components of [a-z0-9._-]")
    if len(path) > 255:
        raise InvalidReference(f"reference {text!r}: repository name longer than 255 characters")
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)
