"""Parsing of OCI references (``registry/ns/name[:tag][@digest]``) with Docker's normalisation rules."""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelcache.digest import Digest
from modelcache.errors import InvalidReference

DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
MAX_REFERENCE_LENGTH = 4096

_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DOMAIN = re.compile(r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                     r"(?::[0-9]{1,5})?$|^\[[0-9a-fA-F:.]+\](?::[0-9]{1,5})?$")


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
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        registry, path = first, rest
        if not _DOMAIN.match(registry):
            raise InvalidReference(f"reference {text!r}: invalid registry host {registry!r}")
    else:
        registry, path = DOCKER_HUB, remainder
        if "/" not in path:
            path = f"library/{path}"
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    components = path.split("/")
    if not path or not all(_COMPONENT.match(c) for c in components):
        raise InvalidReference(
            f"reference {text!r}: repository {path!r} must be lower-case path components of [a-z0-9._-]")
    if len(path) > 255:
        raise InvalidReference(f"reference {text!r}: repository name longer than 255 characters")
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)
