"""A model readable before its download has finished: the tree of a resolved manifest, built at once,
whose file reads are served from committed blobs, or else by fetching aligned chunks with HTTP Range
requests into a sparse partial blob, while the ordinary pull fills the cache in the background.

Raw layers (ModelPack's recommended form, ORAS files) are lazy byte for byte. Uncompressed tar layers
are indexed by reading their headers with range requests and served lazily too. Compressed tar layers
(and container-image layouts, whose whiteouts need every layer) cannot be read at an offset: their
paths appear once the background pull has finished.

Integrity: an OCI digest covers a whole blob, not a chunk. A model pushed with a chunk index (see
:mod:`modelcache.trust.chunkindex`) has every chunk verified before it is served; a chunk that fails is asked
of the next endpoint, then the read fails. Without an index, every range is recorded on disk before it is
served and compared with the verified blob by whoever commits it (:mod:`modelcache.store.servedranges`, which
survives restarts); a mismatch marks the model broken and every later read fails. Strict mode serves a
file only once its blob is verified and committed.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modelcache.assemble.layout import Plan
from modelcache.assemble.options import PullOptions
from modelcache.assemble.paths import PathFilter, safe_relpath
from modelcache.assemble.safetar import checked_members, open_tar, tar_errors
from modelcache.assemble.treerules import Budget
from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import IntegrityError, Kind, ModelCacheError, UnsafeContent
from modelcache.fsutil import pwrite_all
from modelcache.lazy.chunkcache import RANGE_CHUNK, ChunkCache
from modelcache.lazy.lazytree import Node as Node
from modelcache.lazy.lazytree import Source, check_links, ensure_dir, merge_layer
from modelcache.progress import Progress
from modelcache.records import PullResult
from modelcache.registry.client import Resolved
from modelcache.registry.mediatypes import Compression
from modelcache.store.rangedingest import RangedView, covers
from modelcache.trust import chunkindex
from modelcache.trust.chunkindex import ChunkIndex

log = logging.getLogger(__name__)

READAHEAD_CHUNKS = 4
STRICT_WAIT = 3600.0
LOCAL_READAHEAD = 32 << 20  # how far ahead of a sequential reader the committed blob is read
LOCAL_READ_SIZE = 4 << 20
LIVE_UNIT = 4 << 20  # without a chunk index, what is served from a running download is recorded in these
LIVE_NEAR = 64 << 20  # a reader at most this far ahead of the background pull's stream waits for it ...
LIVE_WAIT_SECONDS = 2.0  # ... at most this long, then fetches by range
LIVE_POLL_SECONDS = 0.01


class LazyBroken(ModelCacheError):
    """The model failed verification or its pull failed for good; reads must fail."""


# fetches every blob the model needs into the store (raising ModelCacheError), stopping once the event is set
Download = Callable[[threading.Event], None]


@dataclass
class _LiveFile:
    """A partial file of a ranged download under way, open for reading, and what was read from it."""

    fd: int
    inode: int
    verified: set[int] = field(default_factory=set)  # chunks checked against the chunk index
    recorded: set[int] = field(default_factory=set)  # whole LIVE_UNIT units recorded as served (no index)
    verifying: dict[int, threading.Event] = field(default_factory=dict)  # chunks being checked
    bad: set[int] = field(default_factory=set)  # chunks that failed the check (this file never rewrites them)
    written: list[list[int]] = field(default_factory=list)  # ranges known to be written (they only grow)


class LazyModel:
    """The tree of ``resolved`` and the logic to read it before, during and after the pull."""

    def __init__(self, cache: ModelCache, resolved: Resolved, options: PullOptions, *,
                 strict: bool = False, download: Download | None = None, published_at: float = 0.0) -> None:
        self.cache = cache
        self.published_at = published_at  # verdicts on served bytes reached before then are another volume's
        self.download = download
        self.resolved = resolved
        self.options = options
        self.strict = strict
        self.plan: Plan = cache.plan(resolved, options)
        self.root = Node("dir", 0o555)
        self.pending = False
        self.progress = Progress()
        self.complete = threading.Event()
        self.final: PullResult | None = None
        self.failure: ModelCacheError | None = None
        self._chunks: dict[Digest, ChunkCache] = {}
        self._chunks_lock = threading.Lock()
        self._last_end: dict[Digest, int] = {}
        self._fds: dict[Digest, int] = {}
        self._live: dict[Digest, list[_LiveFile]] = {}  # the background pull's partial files, kept open
        self._local_ahead: dict[Digest, int] = {}  # read ahead of the reader up to here
        self._local_busy: set[Digest] = set()
        self._readahead = threading.Semaphore(4)
        self.lazy_dir = cache.store.root / "lazy"
        self.on_broken: Callable[[str], None] | None = None  # told once when verification fails
        self._told = False
        self.blobs: set[Digest] = set()  # the blobs the tree reads from
        self.stopping = threading.Event()
        self.index: ChunkIndex | None = None  # with one, each chunk is verified before it is served
        self.started = False  # the background pull was started
        self._ranges_failed: set[Digest] = set()  # blobs whose ranges failed the index at every endpoint

    # -- the tree -------------------------------------------------------------------------------------
    def build(self) -> None:
        """Build the tree from the manifest (range-reading the headers of uncompressed tar layers); load
        the model's chunk index when its manifest names one (a named index that cannot be had fails)."""
        self.index = chunkindex.load(self.cache.client, self.resolved.reference, self.resolved.manifest)
        path_filter: PathFilter = self.options.path_filter
        if self.plan.layout == "image":
            self.pending = True
            return
        steps = self.plan.needed(path_filter)
        self.cache.store_synthesized(self.plan, steps)  # a ModelKit's Kitfile: read like a committed raw layer
        budget = Budget.for_model(self.cache.max_model_files, self.cache.max_model_bytes,
                                  sum(s.descriptor.size for s in steps if s.compression.is_tar),
                                  self.cache.expand_ratio)
        for step in steps:
            descriptor = step.descriptor
            if step.compression in (Compression.RAW, Compression.TAR):
                self.blobs.add(descriptor.digest)
            if step.compression is Compression.RAW:
                budget.charge(f"layer {descriptor.digest}", entries=1, nbytes=descriptor.size)
                self._add_file(step.dest, Source(descriptor.digest, descriptor.size, 0, descriptor.size), 0o444)
            elif step.compression is Compression.TAR:
                layer = self._index_tar(descriptor.digest, descriptor.size, budget)
                base = ensure_dir(self.root, step.dest.split("/")) if step.dest else self.root
                merge_layer(base, layer, step.dest, path_filter)
            else:
                self.pending = True
        check_links(self.root)
        if self.plan.subpath:
            sub = self.lookup_path(self.plan.subpath)
            if sub is not None and sub.kind == "dir":
                self.root = sub
            elif not self.pending:
                raise ModelCacheError(f"path {self.plan.subpath!r} is not a directory in the model",
                                      kind=Kind.NOT_FOUND)

    def _add_file(self, relpath: str, source: Source, mode: int) -> None:
        self._place(relpath, Node("file", mode, source.size, source=source))

    def _place(self, relpath: str, node: Node) -> None:
        parts = safe_relpath(relpath, "lazy tree").split("/")
        parent = ensure_dir(self.root, parts[:-1])
        if node.kind == "dir":
            parent.children.setdefault(parts[-1], node)
            return
        parent.children[parts[-1]] = node

    def lookup_path(self, relpath: str) -> Node | None:
        """The node at ``relpath`` (no symlinks followed)."""
        node = self.root
        for part in relpath.split("/"):
            if not part:
                continue
            child = node.children.get(part)
            if child is None:
                return None
            node = child
        return node

    def _index_tar(self, digest: Digest, size: int, budget: Budget) -> Node:
        """The tree of an uncompressed tar blob, from its headers only (read with range requests), built from
        the members as extraction creates them (:func:`modelcache.assemble.safetar.checked_members`: the same checks,
        the same order, links last, the same charges to the model's ``budget``)."""
        what = f"layer {digest}"
        layer = Node("dir", 0o555)
        files: dict[str, Node] = {}
        with tar_errors(what, Compression.TAR), open_tar(_BlobReader(self, digest, size), streaming=False) as archive:
            for member in checked_members(archive, prefix="", budget=budget, what=what):
                info = member.info
                parts = info.name.split("/")
                parent = ensure_dir(layer, parts[:-1])
                if member.removes:
                    parent.children.pop(parts[-1], None)
                elif info.isdir():
                    existing = parent.children.get(parts[-1])
                    if existing is None or existing.kind != "dir":
                        parent.children[parts[-1]] = Node("dir", 0o555)
                elif info.isreg():
                    files[info.name] = parent.children[parts[-1]] = Node(
                        "file", (info.mode & 0o555) | 0o444, info.size,
                        source=Source(digest, size, info.offset_data, info.size))
                elif info.issym():
                    parent.children[parts[-1]] = Node("symlink", 0o777, len(info.linkname), target=info.linkname)
                else:  # a hard link: the same file as the one it names (checked_members: a file of this layer)
                    source = files.get(info.linkname)
                    if source is None:
                        raise UnsafeContent(f"{what}: hard link {info.name!r} points to {info.linkname!r}, "
                                            f"which is not a file of this layer")
                    files[info.name] = parent.children[parts[-1]] = Node("file", source.mode, source.size,
                                                                         source=source.source)
        return layer

    # -- the background pull ----------------------------------------------------------------------------
    def start_background(self) -> threading.Thread:
        """Run the ordinary pull in a thread; when it is done every read is local."""
        def run() -> None:
            try:
                if self.download is not None:
                    self.download(self.stopping)
                self.final = self.cache.materialise(self.resolved, self.options, self.progress,
                                                    cancel=self.stopping)
                for digest in self.blobs:
                    self.cache.store.served.settle(digest)
                    self._check_served(digest)
            except ModelCacheError as exc:
                if exc.kind is Kind.INTEGRITY:
                    self._broken(str(exc))
                elif not self._is_broken():
                    self.failure = exc
                    level = logging.ERROR if exc.kind is Kind.UNSAFE_CONTENT else logging.WARNING
                    log.log(level, "background pull of %s failed: %s", self.resolved.reference, exc)
            except Exception as exc:  # noqa: BLE001 - reported to readers as a failure
                self.failure = ModelCacheError(f"background pull failed: {exc}")
                log.exception("background pull of %s failed", self.resolved.reference)
            finally:
                if self.failure is None or self.failure.kind in (Kind.INTEGRITY, Kind.UNSAFE_CONTENT):
                    self.close()  # after a transient failure the chunks stay, to be compared after the retry
                self.complete.set()

        thread = threading.Thread(target=run, name="lazy-pull", daemon=True)
        self.started = True
        thread.start()
        return thread

    def _is_broken(self) -> bool:
        return self.failure is not None and self.failure.kind in (Kind.INTEGRITY, Kind.UNSAFE_CONTENT)

    def _broken(self, reason: str) -> LazyBroken:
        """Mark the model broken (every later read fails), log and tell :attr:`on_broken` once; the error
        for the read at hand."""
        with self._chunks_lock:
            tell = not self._told
            self._told = True
            if not self._is_broken():
                self.failure = IntegrityError(reason)
        if tell:
            log.error("%s: %s -- THE LAZY MOUNT NOW ANSWERS EIO", self.resolved.reference, reason)
            if self.on_broken is not None:
                self.on_broken(reason)
        return LazyBroken(f"model failed verification: {reason}", kind=Kind.INTEGRITY)

    def _check_served(self, digest: Digest) -> None:
        """Raise :class:`LazyBroken` (marking the model broken) when bytes of ``digest`` served before it was
        verified, by this volume's servers or any other since this volume was published, were wrong."""
        reason = self.cache.store.served.verdict_since(digest, self.published_at)
        if reason is not None:
            raise self._broken(reason)

    def _record_served(self, digest: Digest, start: int, data: bytes) -> None:
        """Record (durably) that ``data`` at ``start`` of unverified blob ``digest`` is about to be served."""
        self.cache.store.served.record(digest, start, data)
        self._check_served(digest)

    def retry_background(self) -> threading.Thread | None:
        """Start the pull again after a failure that was not an integrity error (the registry came back)."""
        if self.failure is None or self._is_broken():
            return None
        self.failure = None
        self.complete.clear()
        return self.start_background()

    def discard(self) -> None:
        """At process exit (the mount is gone): stop the background pull at its next read (it resumes from
        its partial download next time) and delete the chunk files without waiting for fetches in flight."""
        self.stopping.set()
        with self._chunks_lock:
            for chunks in self._chunks.values():
                chunks.discard()
            self._chunks.clear()

    def close(self) -> None:
        """Delete the partial chunk files (the background pull keeps its own resumable ingest)."""
        with self._chunks_lock:
            for chunks in self._chunks.values():
                chunks.close()
            self._chunks.clear()

    # -- reading --------------------------------------------------------------------------------------
    def check_usable(self) -> None:
        """Raise :class:`LazyBroken` when reads must fail (a verification failure is permanent)."""
        if self._is_broken():
            raise LazyBroken(f"model failed verification: {self.failure}", kind=Kind.INTEGRITY)

    def adopt_final_tree(self) -> None:
        """After the pull, describe paths that were pending (compressed layers) from the finished tree."""
        if self.final is None:
            return
        base = self.final.path
        root = Node("dir", 0o555)
        for dirpath, dirnames, filenames in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            parent = root if rel == "." else ensure_dir(root, rel.split("/"))
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    parent.children[name] = Node("symlink", 0o777, st.st_size, target=os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    parent.children.setdefault(name, Node("dir", 0o555))
                else:
                    parent.children[name] = Node("file", stat.S_IMODE(st.st_mode), st.st_size, local=path)
        self.root = root
        self.pending = False

    def read_now(self, node: Node, offset: int, size: int) -> bytes | None:
        """Read ``node`` at once when that needs no network, no waiting and no hashing (its blob is committed,
        or the background pull has the bytes and, with a chunk index, their chunks are verified); None:
        use :meth:`read_node` from a worker thread."""
        if node.local:
            return self.read_node(node, offset, size)  # a file of the finished tree
        source = node.source
        if source is None or self.failure is not None:
            return None
        with self._chunks_lock:
            committed = source.digest in self._fds
        if committed:
            return self.read_node(node, offset, size)  # with its read-ahead of the committed blob
        if offset >= source.size or size <= 0:
            return None
        return self._read_live(source.digest, source.blob_size, source.offset + offset,
                               min(size, source.size - offset), now=True)

    def read_node(self, node: Node, offset: int, size: int) -> bytes:
        """Read a file node: a local file of the finished tree, or its blob source."""
        self.check_usable()
        if node.local:
            fd = os.open(node.local, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        assert node.source is not None
        return self.read(node.source, offset, size)

    def read(self, source: Source, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of a file at ``offset`` (blocking: call from a worker thread)."""
        self.check_usable()
        if offset >= source.size or size <= 0:
            return b""
        size = min(size, source.size - offset)
        return self.read_blob(source.digest, source.blob_size, source.offset + offset, size)

    def read_blob(self, digest: Digest, blob_size: int, offset: int, size: int) -> bytes:
        """``size`` bytes of blob ``digest`` at ``offset``: committed blob, else chunks from the registry."""
        committed = self.cache.store.blob_path(digest)
        if self.strict and not committed.exists():
            deadline = time.monotonic() + STRICT_WAIT
            while not committed.exists():
                self.check_usable()
                if self.complete.is_set() and self.failure is not None:
                    raise LazyBroken(f"blob {digest} is not available: {self.failure}", kind=self.failure.kind)
                if time.monotonic() > deadline:
                    raise ModelCacheError(f"blob {digest} was not verified in time", kind=Kind.UNAVAILABLE)
                self.complete.wait(0.05)
        fd = self._committed_fd(digest, committed)
        if fd is None:
            live = self._read_live(digest, blob_size, offset, size)
            if live is not None:
                return live
            if digest not in self._ranges_failed:
                try:
                    return self._read_chunked(digest, blob_size, offset, size)
                except IntegrityError as exc:
                    if self.index is None or not self.index.covers(digest):
                        raise
                    self._ranges_failed.add(digest)
                    log.warning("%s; reads of blob %s now wait for its verified download", exc, digest)
            return self._await_download(digest, blob_size, offset, size)
        if self._last_end.get(digest) == offset:
            # FUSE asks for 128 KiB at a time, one after another: read the backing file ahead of the
            # reader in a thread, so that its requests find the pages in page cache
            self._read_ahead_local(digest, fd, offset + size, blob_size)
        self._last_end[digest] = offset + size
        return os.pread(fd, size, offset)

    def _await_download(self, digest: Digest, blob_size: int, offset: int, size: int) -> bytes:
        """Serve a blob of which no endpoint answered a range with the bytes the chunk index names: from its
        download (verified chunks of the one under way, or the committed blob), waiting as strict mode does;
        fail only when the download has failed too."""
        committed = self.cache.store.blob_path(digest)
        deadline = time.monotonic() + STRICT_WAIT
        while True:
            self.check_usable()
            fd = self._committed_fd(digest, committed)
            if fd is not None:
                return os.pread(fd, size, offset)
            live = self._read_live(digest, blob_size, offset, size)
            if live is not None:
                return live
            if self.complete.is_set() and self.failure is not None:
                raise LazyBroken(f"blob {digest}: no endpoint answered its ranges right and its download failed: "
                                 f"{self.failure}", kind=self.failure.kind)
            if time.monotonic() > deadline:
                raise ModelCacheError(f"blob {digest} was not verified in time", kind=Kind.UNAVAILABLE)
            self.complete.wait(0.05)

    def _read_ahead_local(self, digest: Digest, fd: int, offset: int, blob_size: int) -> None:
        with self._chunks_lock:
            ahead = self._local_ahead.get(digest, 0)
            if ahead >= min(offset + LOCAL_READAHEAD, blob_size) or digest in self._local_busy:
                return
            start = max(ahead, offset)
            end = min(offset + 2 * LOCAL_READAHEAD, blob_size)
            self._local_ahead[digest] = end
            self._local_busy.add(digest)

        def run() -> None:
            buffer = bytearray(LOCAL_READ_SIZE)
            try:
                position = start
                while position < end:
                    n = os.preadv(fd, [memoryview(buffer)[:min(LOCAL_READ_SIZE, end - position)]], position)
                    if n <= 0:
                        break
                    position += n
            except OSError as exc:
                log.debug("read-ahead of %s failed: %s", digest, exc)
            finally:
                with self._chunks_lock:
                    self._local_busy.discard(digest)

        threading.Thread(target=run, name="local-readahead", daemon=True).start()

    def _read_live(self, digest: Digest, blob_size: int, offset: int, size: int, *, now: bool = False
                   ) -> bytes | None:
        """Read from the background pull's download when it holds the bytes (or is about to: a reader just
        behind the pull waits for it rather than fetching the same bytes again). With a chunk index each
        chunk is verified first, once; without one, what was served is compared with the verified blob once
        it commits, and a mismatch turns every later read into EIO (the floor). With ``now`` (the FUSE
        event loop) only what needs no opening, waiting or hashing. None: read another way."""
        index = self.index if self.index is not None and self.index.covers(digest) else None
        unit = index.chunk_size if index is not None else LIVE_UNIT
        first, last = offset // unit, (offset + size - 1) // unit
        span = (first * unit, min((last + 1) * unit, blob_size)) if index is not None else (offset, offset + size)
        with self._chunks_lock:
            files = self._live.get(digest)
        live = files[-1] if files else None
        if now:
            if live is None or not self._written(live, digest, *span):
                return None
        else:
            view = self._await_live_view(digest, blob_size, span[0])
            if view is None or (not view.on_disk(*span)
                                and not view.wait_on_disk(*span, LIVE_WAIT_SECONDS, LIVE_NEAR)):
                return None
            live = self._live_file(digest, view.partial)
            if live is None:
                return None
        if index is not None:
            chunks = range(first, last + 1)
            if now and not all(chunk in live.verified for chunk in chunks):
                return None
            if not now and not all(self._verify_live_chunk(live, digest, blob_size, chunk) for chunk in chunks):
                return None
            if not now or offset % unit == 0 or offset % unit <= unit // 2 < (offset + size) % unit:
                self._verify_ahead(live, digest, blob_size, last + 1)  # at most twice per chunk from the loop
        elif not all(unit in live.recorded for unit in range(first, last + 1)):
            if now:
                return None
            self._record_live(live, digest, blob_size, offset, size)
        data = os.pread(live.fd, size, offset)
        return data if len(data) == size else None

    def _record_live(self, live: _LiveFile, digest: Digest, blob_size: int, offset: int, size: int) -> None:
        """Without a chunk index: record what a read of the running download serves, per whole LIVE_UNIT
        once it is written (a ranged download never rewrites a byte of its file), else just the bytes read."""
        for unit in range(offset // LIVE_UNIT, (offset + size - 1) // LIVE_UNIT + 1):
            if unit in live.recorded:
                continue
            start, end = unit * LIVE_UNIT, min((unit + 1) * LIVE_UNIT, blob_size)
            whole = self._written(live, digest, start, end)
            if not whole:
                start, end = max(start, offset), min(end, offset + size)
            self._record_served(digest, start, os.pread(live.fd, end - start, start))
            if whole:
                with self._chunks_lock:
                    live.recorded.add(unit)

    def _await_live_view(self, digest: Digest, blob_size: int, offset: int) -> RangedView | None:
        """The ranged download of ``digest`` under way; a reader near the start of a blob that download is
        about to fetch (the background pull has not got there yet) waits for it rather than fetching the
        same bytes itself, for at most LIVE_WAIT_SECONDS."""
        view = self.cache.store.live_ingest(digest)
        if view is not None or offset >= LIVE_NEAR or blob_size < self.cache.ranged_min_size or \
                self.download is None or not self.started or self.complete.is_set():
            return view
        deadline = time.monotonic() + LIVE_WAIT_SECONDS
        while view is None and time.monotonic() < deadline and not self.complete.is_set():
            time.sleep(LIVE_POLL_SECONDS)
            view = self.cache.store.live_ingest(digest)
        return view

    def _written(self, live: _LiveFile, digest: Digest, start: int, end: int) -> bool:
        """True when bytes ``[start, end)`` of ``live`` are written: from what is known, else from the
        download's state file (when it still describes this very file)."""
        if covers(live.written, start, end):
            return True
        view = self.cache.store.live_ingest(digest)
        try:
            if view is None or view.partial.stat().st_ino != live.inode:
                return False
            written = view.filled()
            if view.partial.stat().st_ino != live.inode:  # the download started over meanwhile
                return False
        except FileNotFoundError:
            return False
        live.written = written
        return covers(written, start, end)

    def _verify_live_chunk(self, live: _LiveFile, digest: Digest, blob_size: int, chunk: int) -> bool:
        """Check one chunk of the running download against the chunk index, once (a caller that finds it
        being checked waits for that check); False when it does not match."""
        assert self.index is not None
        with self._chunks_lock:
            if chunk in live.verified or chunk in live.bad:
                return chunk in live.verified
            event = live.verifying.get(chunk)
            mine = event is None
            if event is None:
                event = live.verifying[chunk] = threading.Event()
        if not mine:
            event.wait()
            with self._chunks_lock:
                return chunk in live.verified
        try:
            unit = self.index.chunk_size
            data = os.pread(live.fd, min(unit, blob_size - chunk * unit), chunk * unit)
            if hashlib.sha256(data).hexdigest() != self.index.expected(digest, chunk):
                log.warning("chunk %d of %s in the running download does not match the chunk index; reading it "
                            "by range instead", chunk, digest)
                with self._chunks_lock:
                    live.bad.add(chunk)
                return False
            with self._chunks_lock:
                live.verified.add(chunk)
            return True
        finally:
            with self._chunks_lock:
                live.verifying.pop(chunk, None)
            event.set()

    def _verify_ahead(self, live: _LiveFile, digest: Digest, blob_size: int, chunk: int) -> None:
        """Check the chunk after the one being read in a thread, once the download holds it, so that a
        sequential reader finds it verified (hashing overlaps reading)."""
        assert self.index is not None
        unit = self.index.chunk_size
        with self._chunks_lock:
            if chunk * unit >= blob_size or chunk in live.verified or live.verifying:
                return
        if not self._written(live, digest, chunk * unit, min((chunk + 1) * unit, blob_size)):
            return
        threading.Thread(target=self._verify_live_chunk, args=(live, digest, blob_size, chunk),
                         name="verify-ahead", daemon=True).start()

    def _live_file(self, digest: Digest, partial: Path) -> _LiveFile | None:
        """The open partial file of ``digest`` (a new one when the ingest started over in a new file)."""
        with self._chunks_lock:
            files = self._live.setdefault(digest, [])
            try:
                inode = partial.stat().st_ino
                if files and files[-1].inode == inode:
                    return files[-1]
                fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            files.append(_LiveFile(fd, os.fstat(fd).st_ino))
            return files[-1]

    def _committed_fd(self, digest: Digest, path: Path) -> int | None:
        """An open descriptor of a committed blob, kept for the life of the model; before the first, what was
        served of the blob before it was verified is compared with it (whoever committed it)."""
        with self._chunks_lock:
            fd = self._fds.get(digest)
        if fd is not None:
            return fd
        if not path.exists():
            return None
        self.cache.store.served.settle(digest)
        self._check_served(digest)
        with self._chunks_lock:
            fd = self._fds.get(digest)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._fds[digest] = fd
            return fd

    def _chunk_cache(self, digest: Digest, blob_size: int) -> ChunkCache:
        with self._chunks_lock:
            cache = self._chunks.get(digest)
            if cache is None:
                size = self.index.chunk_size if self.index is not None and self.index.covers(digest) else RANGE_CHUNK
                cache = ChunkCache(self.lazy_dir / f"{digest.algorithm}-{digest.hex}.part", blob_size, size)
                self._chunks[digest] = cache
            return cache

    def _read_chunked(self, digest: Digest, blob_size: int, offset: int, size: int) -> bytes:
        chunks = self._chunk_cache(digest, blob_size)
        if not chunks.enter():  # the blob was committed meanwhile
            self.check_usable()
            fd = self._committed_fd(digest, self.cache.store.blob_path(digest))
            if fd is None:
                raise ModelCacheError(f"blob {digest} is neither committed nor fetchable", kind=Kind.UNAVAILABLE)
            return os.pread(fd, size, offset)
        try:
            first, last = offset // chunks.chunk_size, (offset + size - 1) // chunks.chunk_size
            for index in range(first, last + 1):
                self._ensure_chunk(chunks, digest, index)
            sequential = self._last_end.get(digest) == offset
            self._last_end[digest] = offset + size
            if sequential or offset == 0:
                self._read_ahead(chunks, digest, last + 1)
            return os.pread(chunks.fd, size, offset)
        finally:
            chunks.leave()

    def _ensure_chunk(self, chunks: ChunkCache, digest: Digest, index: int) -> None:
        while True:
            with chunks.lock:
                if index in chunks.present:
                    return
                event = chunks.inflight.get(index)
                if event is None:
                    event = chunks.inflight[index] = threading.Event()
                    mine = True
                else:
                    mine = False
            if not mine:
                event.wait()
                continue
            try:
                start = index * chunks.chunk_size
                length = min(chunks.chunk_size, chunks.size - start)
                expected = self.index.expected(digest, index) if self.index is not None else None
                self.cache.client.read_range(self.resolved.reference, digest, start, length, chunks.size,
                                             functools.partial(pwrite_all, chunks.fd), expected)
                if expected is None:  # no chunk index: the floor
                    self._record_served(digest, start, os.pread(chunks.fd, length, start))
                with chunks.lock:
                    chunks.present.add(index)
            finally:
                with chunks.lock:
                    chunks.inflight.pop(index, None)
                event.set()

    def _read_ahead(self, chunks: ChunkCache, digest: Digest, start: int) -> None:
        total = (chunks.size + chunks.chunk_size - 1) // chunks.chunk_size
        for index in range(start, min(start + READAHEAD_CHUNKS, total)):
            with chunks.lock:
                if index in chunks.present or index in chunks.inflight:
                    continue
            if not self._readahead.acquire(blocking=False):
                return

            def fetch(i: int = index) -> None:
                try:
                    if chunks.enter():
                        try:
                            self._ensure_chunk(chunks, digest, i)
                        finally:
                            chunks.leave()
                except (ModelCacheError, OSError) as exc:
                    log.debug("read-ahead of chunk %d of %s failed: %s", i, digest, exc)
                finally:
                    self._readahead.release()

            threading.Thread(target=fetch, daemon=True, name="readahead").start()


class _BlobReader:
    """A read-only, seekable file over a blob read through :meth:`LazyModel.read_blob` (so tarfile can read
    the headers of an uncompressed tar layer and seek over the data it never reads)."""

    def __init__(self, model: LazyModel, digest: Digest, size: int) -> None:
        self.model, self.digest, self.size, self.position = model, digest, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.position if n is None or n < 0 else min(n, self.size - self.position)
        if n <= 0:
            return b""
        data = self.model.read_blob(self.digest, self.size, self.position, n)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.position, os.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return True
