"""Content digests and readers/writers that verify them while streaming."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from modelcache.errors import IntegrityError

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True, order=True)
class Digest:
    """An OCI digest such as ``sha256:<64 hex>``; only sha256 and sha512 are accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse and validate ``text``; raise ValueError with a reason."""
        match = _DIGEST.match(text or "")
        if not match:
            raise ValueError(f"invalid digest {text!r}")
        algorithm, value = match.groups()
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise ValueError(f"unsupported digest algorithm {algorithm!r}")
        if len(value) != length or not re.fullmatch(r"[0-9a-f]+", value):
            raise ValueError(f"invalid {algorithm} digest {text!r}")
        return cls(algorithm, value)

    @classmethod
    def of_bytes(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of ``data``."""
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        """A fresh hash object of this digest's algorithm."""
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


class Verifier:
    """Accumulates bytes and checks them against an expected digest and size."""

    def __init__(self, expected: Digest, size: int | None, what: str) -> None:
        self.expected = expected
        self.size = size
        self.what = what
        self.count = 0
        self._hash = expected.hasher()

    def reset(self) -> None:
        """Start over from byte 0."""
        self.count = 0
        self._hash = self.expected.hasher()

    def update(self, chunk: bytes | memoryview) -> None:
        """Feed ``chunk``; raise as soon as more bytes than declared arrive."""
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise IntegrityError(f"{self.what}: more than the declared {self.size} bytes")
        self._hash.update(chunk)

    def verify(self) -> None:
        """Raise :class:`IntegrityError` unless size and digest match."""
        if self.size is not None and self.count != self.size:
            raise IntegrityError(f"{self.what}: got {self.count} bytes, descriptor says {self.size}")
        actual = self._hash.hexdigest()
        if actual != self.expected.hex:
            raise IntegrityError(
                f"{self.what}: digest mismatch (expected {self.expected}, got {self.expected.algorithm}:{actual})")
