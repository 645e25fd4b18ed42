"""Reads of a lazy model fetched by HTTP Range requests: aligned chunks into a sparse partial blob (verified
against the chunk index when the model has one, else recorded as served), with read-ahead for sequential
readers."""

from __future__ import annotations

import functools
import logging
import os
import threading

from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.fsutil import pwrite_all
from modelcache.lazy.chunkcache import RANGE_CHUNK, ChunkCache
from modelcache.lazy.state import LazyState

log = logging.getLogger(__name__)

READAHEAD_CHUNKS = 4


class RangeReads(LazyState):
    """Reading chunks of a blob fetched from the registry."""

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
