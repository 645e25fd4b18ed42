"""Content-addressed blob store: ``blobs/<alg>/<hex>``, written once, verified, read-only.

Ingest goes to ``ingest/<alg>-<hex>`` under a per-digest lock; a partial ingest left by a killed
process is re-hashed and resumed with a Range request. A verified blob is fsynced, renamed into
place and stripped of write bits; then what lazy mounts served of it before is compared with it
(:mod:`modelcache.store.servedranges`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from modelcache.digest import Digest, Verifier
from modelcache.errors import IntegrityError, RangesUnsupported, StoreFull
from modelcache.fsutil import WritebackWindows, file_lock, fsync_dir, raise_if_full
from modelcache.store.rangedingest import RangedIngest, RangedView, RangeFetch, ingest_mark
from modelcache.store.rangedingest import clear as clear_ranged
from modelcache.store.servedranges import ServedRanges

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/var/lib/ocimodel")
SHARED_MODE = 0o711  # root, blobs/, blobs/<alg>/, layers/, trees/: traversable, never listable by other users
PRIVATE_MODE = 0o700
PRIVATE_DIRS = ("ingest", "locks", "models", "lazy", "verdicts", "quarantine", "agent", "csi")
Fetcher = Callable[[IO[bytes], Verifier], None]


DEFAULT_MAX_CONNECTIONS = 32  # concurrent Range connections per node, all pulls together
SLOT_POLL_SECONDS = 0.05


class WriteBehind:
    """A file writer that keeps writeback going behind it (see :class:`WritebackWindows`)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.fd = raw.fileno()
        self.position = raw.tell()
        self.windows = WritebackWindows(self.fd, self.position)

    def write(self, data: bytes | memoryview) -> int:
        """Write all of ``data`` and kick writeback when a window fills."""
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
            self.position += written
        self.windows.advance(self.position)
        return len(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Reposition (used when a registry ignores a Range request and the blob restarts)."""
        self.position = self.raw.seek(offset, whence)
        self.windows.restart(self.position)
        return self.position

    def truncate(self, size: int | None = None) -> int:
        """Truncate the underlying file."""
        return self.raw.truncate(size)

    def tell(self) -> int:
        """Current position."""
        return self.position


def _commit(partial: Path, target: Path) -> None:
    """Publish a verified, synced ingest as a read-only blob with one durable rename."""
    os.chmod(partial, 0o444)
    if not target.parent.is_dir():  # a digest algorithm seen for the first time
        target.parent.mkdir(exist_ok=True)
        os.chmod(target.parent, SHARED_MODE)
    os.replace(partial, target)
    fsync_dir(target.parent)


def blob_lease(digest: Digest | str) -> str:
    """The lease name of a blob."""
    algorithm, _, hexpart = str(digest).partition(":")
    return f"blob-{algorithm}-{hexpart}"


class ContentStore:
    """Blobs by digest under ``root``; the same root holds layers, trees and model records."""

    def __init__(self, root: Path | str = DEFAULT_ROOT, *, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.root = Path(root)
        self.max_connections = max_connections
        self.blobs = self.root / "blobs"
        self.ingest_dir = self.root / "ingest"
        self.locks = self.root / "locks"
        self.layers = self.root / "layers"
        self.trees = self.root / "trees"
        self.models = self.root / "models"
        self.served = ServedRanges(self.root, self.blob_path)  # what lazy mounts served before verification

    def ensure(self) -> None:
        """Create the directory layout and set its modes (also on a store an older version made): other
        users of the node may traverse the root, blobs and trees but list nothing, and cannot enter the rest
        (pods see trees through mounts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, SHARED_MODE)
        for shared in (self.blobs, self.blobs / "sha256", self.layers, self.trees):
            shared.mkdir(exist_ok=True)
            os.chmod(shared, SHARED_MODE)
        for algorithm in self.blobs.iterdir():
            if algorithm.is_dir() and not algorithm.is_symlink():
                os.chmod(algorithm, SHARED_MODE)
        for name in PRIVATE_DIRS:
            (self.root / name).mkdir(exist_ok=True)
            os.chmod(self.root / name, PRIVATE_MODE)

    # -- paths and locks --------------------------------------------------------------------------------
    def blob_path(self, digest: Digest) -> Path:
        """Where the blob ``digest`` lives once committed."""
        return self.blobs / digest.algorithm / digest.hex

    def has_blob(self, digest: Digest, size: int | None = None) -> bool:
        """True when ``digest`` is committed (and has ``size`` bytes when given)."""
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    @contextlib.contextmanager
    def lock(self, name: str, *, shared: bool = False) -> Iterator[None]:
        """Hold the named lock (blocking)."""
        with file_lock(self.locks / f"{name}.lock", shared=shared):
            yield

    @contextlib.contextmanager
    def lease(self, *names: str) -> Iterator[None]:
        """Hold shared leases on ``names`` (see :func:`blob_lease`, ``tree-<key>``, ``layer-<name>``): while
        held, gc, eviction and ``cache rm`` leave those objects alone. Works across threads and processes."""
        with contextlib.ExitStack() as stack:
            for name in sorted(set(names)):
                stack.enter_context(file_lock(self.locks / f"lease-{name}.lock", shared=True))
            yield

    @contextlib.contextmanager
    def claim(self, name: str) -> Iterator[bool]:
        """Try to take ``name`` for removal without waiting: True while no one holds a lease on it (and,
        while claimed, no one can take one). False: it is in use; leave it."""
        with file_lock(self.locks / f"lease-{name}.lock", blocking=False) as claimed:
            yield claimed

    @contextlib.contextmanager
    def connection_slot(self) -> Iterator[None]:
        """Hold one of the node's :attr:`max_connections` range-connection slots (flocks under ``locks/``, so
        the limit holds across the plugin, the agent and the CLI), waiting while all are taken."""
        while True:
            for index in range(self.max_connections):
                with file_lock(self.locks / f"connection-{index}.lock", blocking=False) as got:
                    if got:
                        yield
                        return
            time.sleep(SLOT_POLL_SECONDS)

    def pulling(self, model: str) -> contextlib.AbstractContextManager[bool]:
        """Mark model ``model`` (its tree key) as being pulled whole, by this thread or process, while held:
        a lazy mount's server then leaves its download to that pull. Works across processes."""
        return file_lock(self.locks / f"pull-{model}.lock", shared=True)

    def pull_in_progress(self, model: str) -> bool:
        """True while some thread or process holds :meth:`pulling` for ``model``."""
        with file_lock(self.locks / f"pull-{model}.lock", blocking=False) as got:
            return not got

    def fetch_in_progress(self, digest: Digest) -> bool:
        """True when a thread or process holds the fetch lock of ``digest`` (it is downloading it)."""
        with file_lock(self.locks / f"blob-{digest.algorithm}-{digest.hex}.lock", blocking=False) as got:
            return not got

    def live_ingest(self, digest: Digest) -> RangedView | None:
        """A view of the ranged ingest of ``digest`` under way (in any process), for lazy mounts to read
        the bytes it already holds; None when there is none."""
        partial, state = self.ranged_paths(digest)
        return RangedView(partial, state) if partial.exists() else None

    def ranged_paths(self, digest: Digest) -> tuple[Path, Path]:
        """The partial file and the state file of a ranged ingest."""
        base = self.ingest_dir / f"{digest.algorithm}-{digest.hex}.ranged"
        return base, base.with_name(base.name + ".json")

    def partial_path(self, digest: Digest) -> Path:
        """Where an ingest of ``digest`` accumulates."""
        return self.ingest_dir / f"{digest.algorithm}-{digest.hex}"

    @contextlib.contextmanager
    def _fetching(self, digest: Digest, size: int) -> Iterator[bool]:
        """True when the blob is already committed; else hold its fetch lock (one fetcher per digest across
        threads and processes), having removed a committed copy of the wrong size."""
        if self.has_blob(digest, size):
            yield True
            return
        with self.lock(f"blob-{digest.algorithm}-{digest.hex}"):
            if self.has_blob(digest, size):
                yield True
                return
            target = self.blob_path(digest)
            if target.exists():
                log.warning("blob %s has the wrong size on disk; fetching it again", digest)
                target.unlink()
            yield False

    # -- writing ----------------------------------------------------------------------------------------
    def ingest(self, digest: Digest, size: int, fetch: Fetcher) -> Path:
        """Make sure blob ``digest`` of ``size`` bytes is committed, calling ``fetch`` to stream it.

        Only one process or thread fetches a digest at a time; others wait and reuse the result.
        """
        target = self.blob_path(digest)
        with self._fetching(digest, size) as present:
            if present:
                return target
            partial = self.partial_path(digest)
            verifier = Verifier(digest, size, f"blob {digest}")
            try:
                with open(partial, "ab+", buffering=0) as raw:
                    self._rehash(raw, verifier, size)
                    out = WriteBehind(raw)
                    fetch(out, verifier)  # type: ignore[arg-type]
                    os.fdatasync(raw.fileno())
                _commit(partial, target)
                self.served.settle(digest)
            except IntegrityError:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                raise
            except OSError as exc:
                try:
                    raise_if_full(exc, f"blob {digest}")
                except StoreFull as full:  # the disk filled with bytes that arrived: the rest is what it needs
                    raise StoreFull(str(full), needed=size - verifier.count) from None
                raise
            return target

    @staticmethod
    def _rehash(out: IO[bytes], verifier: Verifier, size: int) -> None:
        """Feed what a previous, interrupted ingest wrote into ``verifier`` so it can resume."""
        out.seek(0, os.SEEK_END)
        existing = out.tell()
        if existing == 0:
            return
        if existing > size:
            out.truncate(0)
            return
        out.seek(0)
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        while True:
            n = out.readinto(buffer)  # type: ignore[attr-defined]
            if not n:
                break
            verifier.update(view[:n])
        log.info("resuming blob %s at byte %d of %d", verifier.expected, verifier.count, size)

    def ingest_ranged(self, digest: Digest, size: int, fetch: RangeFetch, *, workers: int,
                      on_bytes: Callable[[int], None]) -> int:
        """Like :meth:`ingest`, with ``workers`` concurrent Range requests (see :mod:`modelcache.store.rangedingest`);
        return the bytes a killed earlier attempt had already fetched. :class:`RangesUnsupported` leaves
        nothing behind, for the caller to fall back to one stream."""
        target = self.blob_path(digest)
        with self._fetching(digest, size) as present:
            if present:
                return size
            partial, state = self.ranged_paths(digest)

            def attempt() -> int:
                return RangedIngest(digest, size, partial, state, fetch, workers=workers, on_bytes=on_bytes,
                                    slot=self.connection_slot).run()
            resumed = partial.exists() and state.exists()
            try:
                already = attempt()
            except RangesUnsupported:
                self._retire_ranged(digest, partial, state)
                raise
            except IntegrityError:
                if not resumed:
                    raise
                log.warning("blob %s: the resumed download does not match its digest (its partial file was damaged "
                            "or written by another source); fetching it again from the start", digest)
                clear_ranged(partial, state)
                already = attempt()
            _commit(partial, target)
            self.served.settle(digest)
            return already

    def put_bytes(self, digest: Digest, data: bytes) -> Path:
        """Commit a small, already-fetched blob after verifying it."""
        def write(out: IO[bytes], verifier: Verifier) -> None:
            out.seek(0)
            out.truncate()
            verifier.reset()
            verifier.update(data)
            out.write(data)
            verifier.verify()
        return self.ingest(digest, len(data), write)

    def remove_blob(self, digest: Digest) -> None:
        """Delete a committed blob (the caller has checked nothing uses it)."""
        with self.lock(f"blob-{digest.algorithm}-{digest.hex}"):
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(digest).unlink()
            self.served.forget(digest)

    def iter_blobs(self) -> Iterator[tuple[Digest, Path]]:
        """Every committed blob."""
        if not self.blobs.is_dir():
            return
        for algorithm_dir in self.blobs.iterdir():
            for path in algorithm_dir.iterdir():
                try:
                    yield Digest.parse(f"{algorithm_dir.name}:{path.name}"), path
                except ValueError:
                    continue

    def _retire_ranged(self, digest: Digest, partial: Path, state: Path) -> None:
        """Forget a ranged ingest that did not fail its digest (the caller holds its fetch lock); what lazy
        mounts served of it is hashed first (:meth:`ServedRanges.retire`), to be compared with the blob."""
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
            try:
                mark = ingest_mark(fd)
                if mark is not None:
                    self.served.retire(digest, fd, mark, RangedView(partial, state).filled(mark))
            finally:
                os.close(fd)
        clear_ranged(partial, state)

    def clear_partials(self) -> int:
        """Remove ingests nobody holds a lock for; return how many."""
        removed = 0
        if not self.ingest_dir.is_dir():
            return 0
        for partial in self.ingest_dir.iterdir():
            if not partial.exists():  # a state file removed with its partial file, just now
                continue
            name, _, kind = partial.name.partition(".")  # <alg>-<hex>, or .ranged, .ranged.json(.tmp)
            algorithm, _, hexpart = name.partition("-")
            try:
                digest = Digest.parse(f"{algorithm}:{hexpart}")
            except ValueError:
                digest = None
            with file_lock(self.locks / f"blob-{algorithm}-{hexpart}.lock", blocking=False) as got:
                if not got:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if kind == "ranged" and digest is not None:
                        self._retire_ranged(digest, partial, partial.with_name(partial.name + ".json"))
                    elif kind.startswith("ranged.json") and partial.with_name(f"{name}.ranged").exists():
                        continue  # removed with its partial file
                    elif partial.is_dir():
                        shutil.rmtree(partial)
                    else:
                        partial.unlink()
                removed += 1
        return removed
