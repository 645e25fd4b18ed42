"""Reads of a lazy model served from the background pull's running download: its partial files, opened as
the ranged ingest writes them, with each chunk verified against the chunk index, or without one, what is served
recorded (the floor): once per file by its ingest mark (the download's own digest check covers every byte of
it), or, for a file without a mark, by hashing each range."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

from modelcache.digest import Digest
from modelcache.lazy.state import LazyState, LiveFile
from modelcache.store.rangedingest import RangedView, covers, ingest_mark

log = logging.getLogger(__name__)

LIVE_UNIT = 4 << 20  # without a chunk index, what is served from a running download is recorded in these
LIVE_NEAR = 64 << 20  # a reader at most this far ahead of the background pull's stream waits for it ...
LIVE_WAIT_SECONDS = 2.0  # ... at most this long, then fetches by range
LIVE_POLL_SECONDS = 0.01


class LiveReads(LazyState):
    """Reading what the running download of a blob has written."""

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
            live = self._live_file(digest, view.partial) if view is not None else None
            if view is None or live is None or (  # the file first: its state must name its mark
                    not view.on_disk(*span, live.mark)
                    and not (self.cache.store.fetch_in_progress(digest)  # a partial file nobody writes: no wait
                             and view.wait_on_disk(*span, LIVE_WAIT_SECONDS, LIVE_NEAR, live.mark))):
                return None
        if index is not None:
            chunks = range(first, last + 1)
            if now and not all(chunk in live.verified for chunk in chunks):
                return None
            if not now and not all(self._verify_live_chunk(live, digest, blob_size, chunk) for chunk in chunks):
                return None
            if not now or offset % unit == 0 or offset % unit <= unit // 2 < (offset + size) % unit:
                self._verify_ahead(live, digest, blob_size, last + 1)  # at most twice per chunk from the loop
        elif live.mark is not None:
            if not live.announced:
                if now:
                    return None
                self._announce_live(live, digest)
        elif not all(unit in live.recorded for unit in range(first, last + 1)):
            if now:
                return None
            self._record_live(live, digest, blob_size, offset, size)
        data = os.pread(live.fd, size, offset)
        return data if len(data) == size else None

    def _announce_live(self, live: LiveFile, digest: Digest) -> None:
        """Without a chunk index: record (durably, once) that bytes of this marked partial file are served."""
        with self._chunks_lock:
            if live.announced:
                return
        assert live.mark is not None
        self.cache.store.served.record_live(digest, live.mark)
        self._check_served(digest)
        with self._chunks_lock:
            live.announced = True

    def _record_live(self, live: LiveFile, digest: Digest, blob_size: int, offset: int, size: int) -> None:
        """Without a chunk index, from a partial file without an ingest mark: record what a read of it serves,
        per whole LIVE_UNIT once it is written (a ranged download never rewrites a byte of its file), else
        just the bytes read."""
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

    def _written(self, live: LiveFile, digest: Digest, start: int, end: int) -> bool:
        """True when bytes ``[start, end)`` of ``live`` are written: from what is known, else from the
        download's state file (when it still describes this very file)."""
        if covers(live.written, start, end):
            return True
        view = self.cache.store.live_ingest(digest)
        try:
            if view is None or view.partial.stat().st_ino != live.inode:
                return False
            written = view.filled(live.mark)
            if view.partial.stat().st_ino != live.inode:  # the download started over meanwhile
                return False
        except FileNotFoundError:
            return False
        live.written = written
        return covers(written, start, end)

    def _verify_live_chunk(self, live: LiveFile, digest: Digest, blob_size: int, chunk: int) -> bool:
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

    def _verify_ahead(self, live: LiveFile, digest: Digest, blob_size: int, chunk: int) -> None:
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

    def _live_file(self, digest: Digest, partial: Path) -> LiveFile | None:
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
            files.append(LiveFile(fd, os.fstat(fd).st_ino, ingest_mark(fd)))
            return files[-1]
