"""Parallel ranged ingest of one large blob: fixed-size pieces fetched by concurrent Range requests (from
mirrors or the upstream, whichever the transport picks for each), written at their offsets, hashed in
order as the filled prefix grows (re-read from page cache), committed only once verified. The pieces
already on disk are listed in a small state file, so a killed pull resumes with the pieces it has."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from modelcache.digest import Digest
from modelcache.errors import IntegrityError, ModelCacheError
from modelcache.fsutil import raise_if_full, read_json, start_writeback

log = logging.getLogger(__name__)

PIECE_SIZE = 32 << 20  # at most; a blob is cut into about two pieces per connection
MIN_PIECE = 1 << 20
HASH_BUFFER = 4 << 20
# fetch(start, length, write): stream bytes [start, start+length) of the blob, calling write(offset, data)
RangeFetch = Callable[[int, int, Callable[[int, bytes | memoryview], None]], None]


class RangesUnsupported(ModelCacheError):
    """The registry answered a Range request with the whole blob: fetch it as one stream instead."""


class RangedIngest:
    """Fills ``partial`` (the full size, sparse at first) piece by piece with ``workers`` threads; see
    the module docstring. ``on_bytes`` hears every byte fetched."""

    def __init__(self, digest: Digest, size: int, partial: Path, state: Path, fetch: RangeFetch, *, workers: int,
                 on_bytes: Callable[[int], None], piece_size: int = PIECE_SIZE) -> None:
        self.digest, self.size, self.partial, self.state = digest, size, partial, state
        self.fetch, self.workers, self.on_bytes, self.piece_size = fetch, workers, on_bytes, piece_size
        self.pieces = max(1, -(-size // piece_size))
        self.done: set[int] = set()
        self.hashed = 0  # pieces hashed so far, in order
        self.hasher = hashlib.new(digest.algorithm)
        self.cond = threading.Condition()
        self.failed: BaseException | None = None

    def run(self) -> int:
        """Fetch what is missing and verify everything; return the bytes that were already there."""
        saved = read_json(self.state)
        if isinstance(saved, dict) and saved.get("piece") == self.piece_size and self.partial.exists():
            self.done = {int(i) for i in saved.get("done", []) if 0 <= int(i) < self.pieces}
        else:
            self.partial.unlink(missing_ok=True)
        already = sum(self._length(i) for i in self.done)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.ftruncate(fd, self.size)
            except OSError as exc:
                raise_if_full(exc, f"blob {self.digest}")
                raise
            hasher = threading.Thread(target=self._hash_in_order, args=(fd,), name="ranged-hash", daemon=True)
            hasher.start()
            missing = [i for i in range(self.pieces) if i not in self.done]
            try:
                with ThreadPoolExecutor(max_workers=max(1, min(self.workers, len(missing))),
                                        thread_name_prefix="range") as pool:
                    for future in [pool.submit(self._fetch_piece, fd, i) for i in missing]:
                        future.result()
            except BaseException as exc:
                with self.cond:
                    self.failed = exc
                    self.cond.notify_all()
                raise
            finally:
                hasher.join()
            if self.failed is not None:
                raise self.failed
            if self.hasher.hexdigest() != self.digest.hex:
                self.partial.unlink(missing_ok=True)
                self.state.unlink(missing_ok=True)
                raise IntegrityError(f"blob {self.digest}: content does not match its digest (fetched in ranges)")
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.state.unlink(missing_ok=True)
        return already

    def _length(self, index: int) -> int:
        return min(self.piece_size, self.size - index * self.piece_size)

    def _fetch_piece(self, fd: int, index: int) -> None:
        start, length = index * self.piece_size, self._length(index)
        written = 0

        def write(offset: int, data: bytes | memoryview) -> None:
            nonlocal written
            if self.failed is not None:
                raise self.failed
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
                written += n
            self.on_bytes(len(data))

        try:
            self.fetch(start, length, write)
        except OSError as exc:
            raise_if_full(exc, f"blob {self.digest}")
            raise
        if written != length:
            raise IntegrityError(f"blob {self.digest}: range {start}+{length} gave {written} bytes")
        start_writeback(fd, start, length)  # no waiting: the final fdatasync before commit makes it durable
        with self.cond:
            self.done.add(index)
            _write_state(self.state, {"piece": self.piece_size, "done": sorted(self.done)})
            self.cond.notify_all()

    def _hash_in_order(self, fd: int) -> None:
        buffer = bytearray(HASH_BUFFER)
        view = memoryview(buffer)
        while self.hashed < self.pieces:
            with self.cond:
                while self.hashed not in self.done and self.failed is None:
                    self.cond.wait()
                if self.failed is not None:
                    return
            start, remaining = self.hashed * self.piece_size, self._length(self.hashed)
            while remaining:
                n = os.preadv(fd, [view[:min(remaining, HASH_BUFFER)]], start)
                if n <= 0:
                    with self.cond:
                        self.failed = IntegrityError(f"blob {self.digest}: short read while hashing")
                        self.cond.notify_all()
                    return
                self.hasher.update(view[:n])
                start, remaining = start + n, remaining - n
            self.hashed += 1


def _write_state(path: Path, data: dict[str, object]) -> None:
    """Replace the state file (not fsynced: it only has to survive the process, not the machine, because a
    resumed ingest hashes every piece again and a wrong one fails the digest and starts over)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data))
    os.replace(temporary, path)


def clear(partial: Path, state: Path) -> None:
    """Forget a ranged ingest."""
    for path in (partial, state):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
