"""OCI distribution client: resolve references, fetch manifests and blobs (verified while streaming), push."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urljoin

from modelcache.digest import Digest, Verifier
from modelcache.errors import IntegrityError, Kind, RangesUnsupported, RegistryError
from modelcache.registry import mediatypes as mt
from modelcache.registry.manifest import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    Index,
    Manifest,
    parse_manifest,
    select_from_index,
)
from modelcache.registry.reference import Reference
from modelcache.registry.transport import (
    STREAM_ERRORS,
    Transport,
    body_reader,
    closing_response,
    read_limited,
    scope_for,
)

log = logging.getLogger(__name__)

READ_SIZE = 1 << 20  # bytes read from a blob response at a time (fits L2 between recv, write and hash)
MAX_CONFIG_BYTES = 4 << 20
OnBytes = Callable[[int], None]  # told how many bytes just arrived


@dataclass(frozen=True)
class Resolved:
    """A reference resolved to content: ``digest`` is what the reference points at (maybe an index),
    ``manifest`` the image manifest selected for this node."""

    reference: Reference
    digest: Digest
    manifest: Manifest


class RegistryClient:
    """Talks the OCI distribution API through a :class:`Transport`."""

    def __init__(self, transport: Transport | None = None) -> None:
        self.transport = transport or Transport()

    def _request(self, method: str, ref: Reference, path: str, what: str, **kwargs: object):  # type: ignore[no-untyped-def]
        push = bool(kwargs.pop("push", False))
        return self.transport.request(method, ref.registry, ref.endpoint_host, f"/v2/{ref.repository}{path}",
                                      scope=scope_for(ref.repository, push), what=what, for_push=push,
                                      **kwargs)  # type: ignore[arg-type]

    # -- manifests --------------------------------------------------------------------------------------
    def _get_manifest(self, ref: Reference, selector: str) -> Manifest | Index:
        what = f"manifest {ref.repository}@{selector}" if ":" in selector else f"manifest {ref.repository}:{selector}"
        response = self._request("GET", ref, f"/manifests/{selector}", what, headers={"Accept": mt.ACCEPT_MANIFESTS})
        with closing_response(response):
            raw = read_limited(response, MAX_MANIFEST_BYTES, what)
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            header_digest = response.headers.get("Docker-Content-Digest", "")
        actual = Digest.of_bytes(raw)
        if ":" in selector:  # a digest (tags cannot hold a colon)
            expected = Digest.parse(selector)
            if Digest.of_bytes(raw, expected.algorithm) != expected:
                raise IntegrityError(f"{what}: content does not match its digest")
            actual = expected
        elif header_digest:
            try:
                claimed = Digest.parse(header_digest)
            except ValueError:
                raise IntegrityError(f"{what}: registry sent an invalid Docker-Content-Digest") from None
            if Digest.of_bytes(raw, claimed.algorithm) != claimed:
                raise IntegrityError(f"{what}: content does not match Docker-Content-Digest {claimed}")
            actual = claimed
        return parse_manifest(raw, media_type, actual, what)

    def resolve(self, ref: Reference) -> Resolved:
        """Fetch the manifest ``ref`` points at, following an index to this node's platform."""
        top = self._get_manifest(ref, ref.selector)
        seen = 0
        current = top
        while isinstance(current, Index):
            seen += 1
            if seen > 2:
                raise IntegrityError(f"{ref}: nested indexes deeper than 2 levels")
            chosen = select_from_index(current, str(ref))
            current = self._get_manifest(ref, str(chosen.digest))
            if isinstance(current, Manifest) and len(current.raw) != chosen.size:
                raise IntegrityError(f"{ref}: manifest size differs from its index entry")
        return Resolved(ref, top.digest, current)

    def referrers_tag_index(self, tag: Reference) -> list[dict[str, Any]]:
        """The descriptors listed under a referrers tag schema tag (``sha256-<hex>``); [] if there is none."""
        try:
            found = self._get_manifest(tag, tag.selector)
        except RegistryError as exc:
            if exc.kind is Kind.NOT_FOUND:
                return []
            raise
        if not isinstance(found, Index):
            raise IntegrityError(f"{tag}: the referrers tag does not point at an index")
        return [{"mediaType": d.media_type, "digest": str(d.digest), "size": d.size,
                 **({"artifactType": d.artifact_type} if d.artifact_type else {})} for d in found.manifests]

    def referrers(self, ref: Reference, artifact_type: str) -> list[Descriptor]:
        """Manifests whose subject is digest-pinned ``ref`` and whose artifactType is ``artifact_type``: from
        the referrers API, or, on registries without one, the referrers tag schema (``sha256-<hex>``)."""
        assert ref.digest is not None
        what = f"referrers of {ref.repository}@{ref.digest}"
        response = self._request("GET", ref, f"/referrers/{ref.digest}", what,
                                 headers={"Accept": mt.OCI_INDEX}, params={"artifactType": artifact_type},
                                 ok=lambda s: s in (200, 400, 404, 405))  # no referrers API: the tag schema
        with closing_response(response):
            found = response.status_code == 200 and \
                response.headers.get("Content-Type", "").split(";")[0].strip() == mt.OCI_INDEX
            raw = read_limited(response, MAX_MANIFEST_BYTES, what) if found else b""
        if found:
            parsed = parse_manifest(raw, mt.OCI_INDEX, Digest.of_bytes(raw), what)
            if not isinstance(parsed, Index):
                raise IntegrityError(f"{what}: the registry answered something that is not an index")
            listed = list(parsed.manifests)
        else:
            tag = ref.with_tag(f"{ref.digest.algorithm}-{ref.digest.hex}")
            listed = [Descriptor.from_json(d, what) for d in self.referrers_tag_index(tag)]
        return [d for d in listed if d.artifact_type == artifact_type]

    def head_digest(self, ref: Reference) -> Digest:
        """The digest ``ref`` points at, by a HEAD request (cheap tag resolution)."""
        what = f"manifest {ref.repository}:{ref.selector}"
        response = self._request("HEAD", ref, f"/manifests/{ref.selector}", what,
                                 headers={"Accept": mt.ACCEPT_MANIFESTS})
        response.close()
        header = response.headers.get("Docker-Content-Digest", "")
        try:
            return Digest.parse(header)
        except ValueError:
            return self.resolve(ref).digest

    # -- blobs ------------------------------------------------------------------------------------------
    def get_small_blob(self, ref: Reference, descriptor: Descriptor, limit: int = MAX_CONFIG_BYTES) -> bytes:
        """Fetch and verify a small blob (a config) into memory."""
        if descriptor.size > limit:
            raise IntegrityError(f"blob {descriptor.digest}: {descriptor.size} bytes exceeds the {limit}-byte limit")
        what = f"blob {descriptor.digest}"
        response = self._request("GET", ref, f"/blobs/{descriptor.digest}", what)
        with closing_response(response):
            data = read_limited(response, limit, what)
        verifier = Verifier(descriptor.digest, descriptor.size, what)
        verifier.update(data)
        verifier.verify()
        return data

    def download_blob(self, ref: Reference, descriptor: Descriptor, out: IO[bytes], verifier: Verifier,
                      progress: OnBytes | None = None) -> None:
        """Stream a blob into ``out`` from ``verifier.count`` on, resuming with Range after breaks.

        ``out`` must be positioned at ``verifier.count``. The digest and size are verified at the end;
        more bytes than declared fail at once.
        """
        what = f"blob {descriptor.digest}"
        failures = 0
        policy = self.transport.retry
        while True:
            start = verifier.count
            headers = {"Range": f"bytes={start}-"} if start else {}
            if start == descriptor.size and descriptor.size:
                break
            response = self._request("GET", ref, f"/blobs/{descriptor.digest}", what, headers=headers,
                                     ok=lambda s: s in (200, 206, 416))
            with closing_response(response):
                if response.status_code == 416:
                    raise IntegrityError(f"{what}: the registry has only {start} bytes but the descriptor "
                                         f"says {descriptor.size}")
                if start and not (response.status_code == 206 and
                                  response.headers.get("Content-Range", "").startswith(f"bytes {start}-")):
                    log.info("%s: registry ignored the range request; restarting from 0", what)
                    out.seek(0)
                    out.truncate()
                    verifier.reset()
                try:
                    readinto = body_reader(response, self.transport.retry, what, descriptor.size - start)
                    buffer = bytearray(READ_SIZE)  # one buffer for the whole stream: no allocation per read
                    view = memoryview(buffer)
                    while n := readinto(buffer):
                        verifier.update(view[:n])
                        out.write(view[:n])
                        if progress:
                            progress(n)
                except STREAM_ERRORS as exc:
                    failures += 1
                    if failures >= policy.attempts:
                        raise RegistryError(f"{what}: download kept failing at byte {verifier.count} "
                                            f"({type(exc).__name__})", kind=Kind.UNAVAILABLE) from None
                    log.info("%s: stream broke at byte %d (%s); resuming", what, verifier.count, type(exc).__name__)
                    time.sleep(policy.delay(failures))
                    continue
            if verifier.count >= descriptor.size:
                break
            failures += 1
            if failures >= policy.attempts:
                raise RegistryError(f"{what}: stream ended early at byte {verifier.count} of {descriptor.size}",
                                    kind=Kind.UNAVAILABLE)
        verifier.verify()

    def download_range(self, ref: Reference, digest: Digest, blob_size: int, start: int, length: int,
                       write: Callable[[int, memoryview], None], *, skip_endpoints: int = 0) -> None:
        """The ranged fetcher (parallel ingest pieces, lazy reads): stream bytes ``[start, start+length)`` of
        a blob of ``blob_size`` bytes to ``write(offset, data)`` in order, through one reused buffer,
        resuming within the range after a broken stream. Every 206 must name exactly the asked range; the
        whole blob from byte 0 is asked with a plain GET. :class:`RangesUnsupported` when a registry answers
        a Range request with the whole blob. The bytes are verified by the caller."""
        what = f"blob {digest} range {start}+{length}"
        end, position, failures = start + length - 1, start, 0
        buffer = bytearray(READ_SIZE)
        view = memoryview(buffer)
        while position <= end:
            whole = position == 0 and length == blob_size  # a plain GET: the answer is the whole blob
            response = self._request("GET", ref, f"/blobs/{digest}", what,
                                     headers={} if whole else {"Range": f"bytes={position}-{end}"},
                                     ok=lambda s: s in (200, 206), skip_endpoints=skip_endpoints)
            with closing_response(response):
                if response.status_code == 200 and not whole:
                    raise RangesUnsupported(f"{what}: the registry answered with the whole blob",
                                            kind=Kind.UNSUPPORTED)
                answered = response.headers.get("Content-Range", "")
                if response.status_code == 206 and answered not in (f"bytes {position}-{end}/{blob_size}",
                                                                    f"bytes {position}-{end}/*"):
                    raise IntegrityError(f"{what}: the registry answered {answered or 'no Content-Range'} instead")
                try:
                    readinto = body_reader(response, self.transport.retry, what, end + 1 - position)
                    while position <= end and (n := readinto(buffer)):
                        n = min(n, end + 1 - position)
                        write(position, view[:n])
                        position += n
                except STREAM_ERRORS as exc:
                    failures += 1
                    if failures >= self.transport.retry.attempts:
                        raise RegistryError(f"{what}: download kept failing at byte {position} "
                                            f"({type(exc).__name__})", kind=Kind.UNAVAILABLE) from None
                    time.sleep(self.transport.retry.delay(failures))
                    continue
            if position <= end:
                failures += 1
                if failures >= self.transport.retry.attempts:
                    raise RegistryError(f"{what}: stream ended early at byte {position}", kind=Kind.UNAVAILABLE)

    def read_range(self, ref: Reference, digest: Digest, start: int, length: int, blob_size: int,
                   write: Callable[[int, memoryview], None], expected_sha256: str | None = None) -> None:
        """Stream ``length`` bytes of a blob at ``start`` to ``write`` for a lazy read, through
        :meth:`download_range`. With ``expected_sha256`` (from a chunk index) the bytes must hash to it; an
        endpoint that answers otherwise is passed over for the next one (mirror, then upstream), its bytes
        written over, and when none answers right the read fails. Without one, the caller keeps what was
        served for the floor check."""
        what = f"blob {digest} range {start}+{length}"
        try:
            if expected_sha256 is None:
                self.download_range(ref, digest, blob_size, start, length, write)
                return
            for position in range(len(self.transport.hosts.endpoints(ref.registry, ref.endpoint_host))):
                if self._range_sha256(ref, digest, blob_size, start, length, write, position) == expected_sha256:
                    return
                log.warning("%s: an answer failed its chunk-index hash; trying the next endpoint", what)
        except RangesUnsupported:
            raise RegistryError(f"{what}: registry does not serve ranges", kind=Kind.UNSUPPORTED) from None
        raise IntegrityError(f"{what}: no endpoint answered the bytes the model's chunk index names")

    def _range_sha256(self, ref: Reference, digest: Digest, blob_size: int, start: int, length: int,
                      write: Callable[[int, memoryview], None], skip_endpoints: int) -> str:
        """:meth:`download_range` from the endpoints after the first ``skip_endpoints``; the bytes' sha256."""
        hasher = hashlib.sha256()

        def hashed(offset: int, data: memoryview) -> None:
            hasher.update(data)
            write(offset, data)
        self.download_range(ref, digest, blob_size, start, length, hashed, skip_endpoints=skip_endpoints)
        return hasher.hexdigest()

    def blob_exists(self, ref: Reference, digest: Digest) -> bool:
        """True when the repository already has ``digest``."""
        response = self._request("HEAD", ref, f"/blobs/{digest}", f"blob {digest}", push=True,
                                 ok=lambda s: s in (200, 404))
        response.close()
        return bool(response.status_code == 200)

    def upload_blob(self, ref: Reference, digest: Digest, size: int, body: IO[bytes] | bytes) -> None:
        """Upload a blob monolithically (POST then PUT), streaming ``body``; skip it if present."""
        if self.blob_exists(ref, digest):
            return
        what = f"upload {digest}"
        response = self._request("POST", ref, "/blobs/uploads/", what, push=True, ok=lambda s: s == 202)
        response.close()
        location = response.headers.get("Location", "")
        if not location:
            raise RegistryError(f"{what}: registry gave no upload location", kind=Kind.INTERNAL)
        location = urljoin(response.url, location)  # on another host it gets no credentials (Transport)
        separator = "&" if "?" in location else "?"
        response = self.transport.request(
            "PUT", ref.registry, ref.endpoint_host, f"{location}{separator}digest={digest}",
            scope=scope_for(ref.repository, True), what=what, for_push=True, body=body,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            ok=lambda s: s == 201)
        response.close()

    def put_manifest(self, ref: Reference, raw: bytes, media_type: str) -> Digest:
        """Upload a manifest under ``ref``'s tag (or digest) and return its digest."""
        digest = Digest.of_bytes(raw)
        selector = ref.tag or str(digest)
        response = self._request("PUT", ref, f"/manifests/{selector}", f"manifest {ref.repository}:{selector}",
                                 push=True, body=raw, headers={"Content-Type": media_type},
                                 ok=lambda s: s == 201)
        response.close()
        return digest
