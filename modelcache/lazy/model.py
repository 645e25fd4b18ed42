"""A model readable before its download has finished: the tree of a resolved manifest, built at once,
whose file reads are served from committed blobs, or else by fetching aligned chunks with HTTP Range
requests into a sparse partial blob, while the ordinary pull fills the cache in the background.

Raw layers (ModelPack's recommended form, ORAS files) are lazy byte for byte. Uncompressed tar layers
are indexed by reading their headers with range requests and served lazily too. Compressed tar layers
(and container-image layouts, whose whiteouts need every layer) cannot be read at an offset: their
paths appear once the background pull has finished, and the whole tree does when such a layer comes after
a readable one (it may replace or remove what that one holds).

Integrity: an OCI digest covers a whole blob, not a chunk. A model pushed with a chunk index (see
:mod:`modelcache.trust.chunkindex`) has every chunk verified before it is served; a chunk that fails is asked
of the next endpoint, then the read fails. Without an index, every range is recorded on disk before it is
served and compared with the verified blob by whoever commits it (:mod:`modelcache.store.servedranges`, which
survives restarts); a mismatch marks the model broken and every later read fails. Strict mode serves a
file only once its blob is verified and committed.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
import threading
import time

from modelcache.assemble.paths import PathFilter, safe_relpath
from modelcache.assemble.treerules import Budget
from modelcache.digest import Digest
from modelcache.errors import IntegrityError, Kind, ModelCacheError, UnsafeContent
from modelcache.fsutil import pwrite_all
from modelcache.lazy.announced import announced_file, check_final, check_layer
from modelcache.lazy.chunkcache import RANGE_CHUNK
from modelcache.lazy.fetch import RangeReads
from modelcache.lazy.lazytree import Node as Node
from modelcache.lazy.lazytree import Source, check_links, ensure_dir, merge_layer
from modelcache.lazy.live import LiveReads
from modelcache.lazy.state import LazyBroken
from modelcache.lazy.tarindex import BlobFile, TarLayers, tar_tree
from modelcache.registry.manifest import Descriptor
from modelcache.registry.mediatypes import Compression
from modelcache.trust import chunkindex

log = logging.getLogger(__name__)

STRICT_WAIT = 3600.0
LOCAL_READAHEAD = 32 << 20  # how far ahead of a sequential reader the committed blob is read
LOCAL_READ_SIZE = 4 << 20


class LazyModel(LiveReads, RangeReads):
    """The tree of ``resolved`` and the logic to read it before, during and after the pull."""

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
        readable = [i for i, s in enumerate(steps) if s.compression in (Compression.RAW, Compression.TAR)]
        if readable and any(s.compression not in (Compression.RAW, Compression.TAR) for s in steps[readable[0]:]):
            # a compressed layer after a readable one may replace or remove what that one holds: nothing is
            # shown before the pull has finished, as for container images
            self.pending = True
            return
        self.cache.store_synthesized(self.plan, steps)  # a ModelKit's Kitfile: read like a committed raw layer
        budget = Budget.for_model(self.cache.max_model_files, self.cache.max_model_bytes,
                                  sum(s.descriptor.size for s in steps if s.compression.is_tar),
                                  self.cache.expand_ratio)
        tar_steps = [s for s in steps if s.compression is Compression.TAR]
        announced = [None if s.dest else announced_file(s.descriptor) for s in tar_steps]
        # every tar layer announces its one file: the tree from the manifest alone, each layer checked when read
        self.announced = bool(tar_steps) and None not in announced
        self._checks = Budget.for_model(self.cache.max_model_files, self.cache.max_model_bytes,
                                        sum(s.descriptor.size for s in tar_steps), self.cache.expand_ratio)
        tars = None if self.announced else TarLayers(self._index_tar, [s.descriptor for s in tar_steps], budget)
        announcements = iter(announced)
        for step in steps:
            descriptor = step.descriptor
            if step.compression in (Compression.RAW, Compression.TAR):
                self.blobs.add(descriptor.digest)
            if step.compression is Compression.RAW:
                budget.charge(f"layer {descriptor.digest}", entries=1, nbytes=descriptor.size)
                self._add_file(step.dest, Source(descriptor.digest, descriptor.size, 0, descriptor.size), 0o444)
            elif step.compression is Compression.TAR and tars is not None:
                layer = tars.next(budget)
                base = ensure_dir(self.root, step.dest.split("/")) if step.dest else self.root
                merge_layer(base, layer, step.dest, path_filter)
            elif step.compression is Compression.TAR:
                file = next(announcements)
                assert file is not None
                budget.charge(f"layer {descriptor.digest}", entries=1, nbytes=file.size)
                parts = file.path.split("/")
                parent = ensure_dir(self.root, parts[:-1])  # made for a file left out too, as extraction does
                if path_filter.accepts(file.path):
                    parent.children[parts[-1]] = Node("file", file.mode, file.size, announced=file)
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

    def _index_tar(self, descriptor: Descriptor, budget: Budget) -> Node:
        """The tree of an uncompressed tar layer from its headers (:func:`tar_tree`, charging ``budget``), read
        through :meth:`read_blob`; but a layer the background pull has committed is read from the store (a
        descriptor opened and closed here: thousands of layers must not hold thousands open), and a layer no
        larger than a range chunk, which its first range request would fetch whole anyway, is fetched whole in
        one request, verified against its digest (no range of it is recorded as served), kept as its present
        chunks and its headers read from there."""
        digest, size = descriptor.digest, descriptor.size
        if self.cache.store.has_blob(digest, size):  # committed by the background pull: read here, no fd kept
            try:
                fd = os.open(self.cache.store.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass  # evicted meanwhile: from the registry below
            else:
                try:
                    return tar_tree(BlobFile(size, lambda offset, n: os.pread(fd, n, offset)), digest, size, budget)
                finally:
                    os.close(fd)
        if size <= RANGE_CHUNK and digest.algorithm == "sha256":
            chunks = self._chunk_cache(digest, size)
            if chunks.enter():
                try:
                    count = -(-size // chunks.chunk_size)
                    if len(chunks.present) < count:
                        try:
                            self.cache.client.read_range(self.resolved.reference, digest, 0, size, size,
                                                         functools.partial(pwrite_all, chunks.fd), digest.hex)
                        except IntegrityError:
                            raise IntegrityError(f"layer {digest}: no endpoint answered the blob its digest "
                                                 f"names") from None
                        with chunks.lock:
                            chunks.present.update(range(count))
                    return tar_tree(BlobFile(size, lambda offset, n: os.pread(chunks.fd, n, offset)), digest,
                                    size, budget)
                finally:
                    chunks.leave()
        return tar_tree(BlobFile(size, lambda offset, n: self.read_blob(digest, size, offset, n)), digest, size,
                        budget)

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
                if self.announced:
                    check_final(self.root, self.final.path, exact=not self.pending)
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


    def retry_background(self) -> threading.Thread | None:
        """Start the pull again after a failure that was not an integrity error (the registry came back)."""
        if self.failure is None or self._is_broken():
            return None
        self.failure = None
        self.complete.clear()
        return self.start_background()


    # -- reading --------------------------------------------------------------------------------------
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
            return None  # read_node says why
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
        return self.read(node.source or self._checked_source(node), offset, size)

    def _checked_source(self, node: Node) -> Source:
        """Where the bytes of a file its layer announced are, once the layer's headers are read and found to
        hold that file alone (:func:`check_layer`); a layer holding anything else breaks the model. A layer is
        checked once at a time, and what all checks read is charged to one budget for the model."""
        announced = node.announced
        assert announced is not None
        digest = announced.descriptor.digest
        with self._chunks_lock:
            lock = self._layer_checks.setdefault(digest, threading.Lock())
        with lock:
            if node.source is not None:
                return node.source
            with self._chunks_lock:
                checks = self._checks
                budget = Budget(checks.max_entries, checks.max_bytes, checks.max_expanded, checks.entries, checks.bytes)
            entries, nbytes = budget.entries, budget.bytes
            try:
                source = check_layer(announced, self._index_tar(announced.descriptor, budget))
                with self._chunks_lock:
                    checks.charge(f"layer {digest}", entries=budget.entries - entries, nbytes=budget.bytes - nbytes)
            except (IntegrityError, UnsafeContent) as exc:
                raise self._broken(str(exc)) from None
            node.source = source
            return source

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
