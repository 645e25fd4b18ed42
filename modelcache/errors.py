"""Errors raised by the core, each with a kind that front ends map to their own codes."""

from __future__ import annotations

import enum


class Kind(enum.Enum):
    """What went wrong, independent of any transport."""

    INVALID_ARGUMENT = "invalid argument"
    NOT_FOUND = "not found"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission denied"
    UNAVAILABLE = "unavailable"
    INTEGRITY = "integrity"
    UNSAFE_CONTENT = "unsafe content"
    RESOURCE_EXHAUSTED = "resource exhausted"
    UNSUPPORTED = "unsupported"
    REFUSED = "refused by policy"
    INTERNAL = "internal"


class ModelCacheError(Exception):
    """Base error of the core. ``kind`` says what went wrong; the message is for humans."""

    kind: Kind = Kind.INTERNAL

    def __init__(self, message: str, *, kind: Kind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class InvalidReference(ModelCacheError):
    """A reference string that cannot be parsed."""

    kind = Kind.INVALID_ARGUMENT


class RegistryError(ModelCacheError):
    """An error answered by (or on the way to) a registry."""

    def __init__(self, message: str, *, kind: Kind, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message, kind=kind)
        self.status = status
        self.code = code


class IntegrityError(ModelCacheError):
    """Content whose digest or size does not match its descriptor."""

    kind = Kind.INTEGRITY


class UnsafeContent(ModelCacheError):
    """Content that would escape the tree, create devices, set privileged bits or exhaust the disk."""

    kind = Kind.UNSAFE_CONTENT


class UnsupportedArtifact(ModelCacheError):
    """A manifest or media type this driver does not know how to turn into files."""

    kind = Kind.UNSUPPORTED


class RangesUnsupported(ModelCacheError):
    """The registry answered a Range request with the whole blob: fetch it as one stream instead."""


class StoreFull(ModelCacheError):
    """No space left in the cache root; ``needed`` is how many more bytes were wanted, when known."""

    kind = Kind.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, needed: int = 0) -> None:
        super().__init__(message)
        self.needed = needed


class PullCancelled(ModelCacheError):
    """A pull stopped because its process is shutting down; its partial downloads resume next time."""

    kind = Kind.UNAVAILABLE


class ListenError(ModelCacheError):
    """A server could not listen on ``address``, the value of the configuration field ``setting``
    (``metrics_address``, ``endpoint``); ``reason`` says why (``address already in use``)."""

    kind = Kind.UNAVAILABLE

    def __init__(self, address: str, setting: str, reason: str) -> None:
        self.address, self.setting, self.reason = address, setting, reason[:1].lower() + reason[1:]
        super().__init__(f"{address}: {self.reason}")
