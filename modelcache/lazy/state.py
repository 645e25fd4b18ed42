"""What the readers of a lazy model share: its state (the cache, the resolved manifest, the chunk index, the open
files and chunk caches), the verdict that marks it broken, the record of bytes served before verification, and
the committed blobs it reads once verified."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from modelcache.assemble.layout import Plan
from modelcache.assemble.options import PullOptions
from modelcache.assemble.treerules import Budget
from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import IntegrityError, Kind, ModelCacheError
from modelcache.lazy.chunkcache import ChunkCache
from modelcache.lazy.lazytree import Node
from modelcache.progress import Progress
from modelcache.records import PullResult
from modelcache.registry.client import Resolved
from modelcache.trust.chunkindex import ChunkIndex

log = logging.getLogger(__name__)


class LazyBroken(ModelCacheError):
    """The model failed verification or its pull failed for good; reads must fail."""


# fetches every blob the model needs into the store (raising ModelCacheError), stopping once the event is set
Download = Callable[[threading.Event], None]


@dataclass
class LiveFile:
    """A partial file of a ranged download under way, open for reading, and what was read from it."""

    fd: int
    inode: int
    mark: str | None = None  # its ingest mark: without a chunk index, what is read of it needs no hashing
    announced: bool = False  # the mark is recorded as served (no index)
    verified: set[int] = field(default_factory=set)  # chunks checked against the chunk index
    recorded: set[int] = field(default_factory=set)  # whole LIVE_UNIT units recorded as served (no index)
    verifying: dict[int, threading.Event] = field(default_factory=dict)  # chunks being checked
    bad: set[int] = field(default_factory=set)  # chunks that failed the check (this file never rewrites them)
    written: list[list[int]] = field(default_factory=list)  # ranges known to be written (they only grow)


class LazyState:
    """The state of a lazy model and what every way of reading it needs; :class:`~modelcache.lazy.model.LazyModel`
    adds the tree, the background pull and the reads."""

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
        self.announced = False  # the tree was shown from its tar layers' annotations (modelcache.lazy.announced)
        self._layer_checks: dict[Digest, threading.Lock] = {}  # announced layers being checked, one check each
        self._checks = Budget(0, 0, 0)  # what the checks of announced layers have read, against the model's limits
        self.progress = Progress()
        self.complete = threading.Event()
        self.final: PullResult | None = None
        self.failure: ModelCacheError | None = None
        self._chunks: dict[Digest, ChunkCache] = {}
        self._chunks_lock = threading.Lock()
        self._last_end: dict[Digest, int] = {}
        self._fds: dict[Digest, int] = {}
        self._live: dict[Digest, list[LiveFile]] = {}  # the background pull's partial files, kept open
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

    def check_verdicts(self) -> None:
        """:meth:`check_usable`, after looking for a verdict any process reached on the served bytes of the
        model's blobs (marking the model broken when there is one)."""
        for digest in list(self.blobs):
            self._check_served(digest)
        self.check_usable()

    def _record_served(self, digest: Digest, start: int, data: bytes) -> None:
        """Record (durably) that ``data`` at ``start`` of unverified blob ``digest`` is about to be served."""
        self.cache.store.served.record(digest, start, data)
        self._check_served(digest)

    def discard(self) -> None:
        """At process exit (the mount is gone): stop the background pull at its next read (it resumes from
        its partial download next time) and delete the chunk files without waiting for fetches in flight."""
        self.stopping.set()
        with self._chunks_lock:
            caches = list(self._chunks.values())
            self._chunks.clear()
        for chunks in caches:
            chunks.discard()

    def close(self) -> None:
        """Delete the partial chunk files (the background pull keeps its own resumable ingest). Outside the
        lock: a chunk cache waits for its fetches in flight, and a fetch may need the lock (a verdict)."""
        with self._chunks_lock:
            caches = list(self._chunks.values())
            self._chunks.clear()
        for chunks in caches:
            chunks.close()

    def check_usable(self) -> None:
        """Raise :class:`LazyBroken` when reads must fail (a verification failure is permanent)."""
        if self._is_broken():
            raise LazyBroken(f"model failed verification: {self.failure}", kind=Kind.INTEGRITY)


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

