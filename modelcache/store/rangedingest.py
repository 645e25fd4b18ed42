"""Ranged ingest of one large blob. A lead stream starts at byte 0 and is hashed as it arrives. If, after a
short probe, the lead turns out to wait on the network rather than on this machine's CPU (a registry or CDN
that limits each connection), the rest of the blob is cut into pieces fetched by concurrent Range requests
(from mirrors or the upstream, whichever the transport picks for each) and written at their offsets; the
lead stops where the pieces begin. Past the lead, a hashing thread re-reads from page cache, in order, what
the pieces filled. Nothing is committed unverified. The byte ranges already on disk are listed in a small
state file, so a killed pull resumes with the ranges it has; a listed byte is never written again, so what a
lazy mount reads of the partial file is what the blob holds if it commits. The partial file carries a random
*ingest mark* (an extended attribute, kept by the commit's rename): a lazy mount that served bytes of this
very file knows, from the committed blob's mark, that they were verified with it."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

from modelcache.digest import Digest
from modelcache.errors import IntegrityError
from modelcache.fsutil import WritebackWindows, pwrite_all, raise_if_full, read_json, start_writeback

log = logging.getLogger(__name__)

PIECE_SIZE = 32 << 20  # at most; the rest of a blob is cut into about two pieces per connection
MIN_PIECE = 1 << 20
HASH_BUFFER = 4 << 20
PROBE_SECONDS = 0.5  # how long the lead stream runs alone before the split is decided
BUSY_SHARE = 0.35  # a lead busy (running or runnable) this share of the probe is CPU-bound: no split
STATE_EVERY = 8 << 20  # the lead's progress is written to the state file this often (lazy mounts read it)
VIEW_POLL_SECONDS = 0.005
STATE_VERSION = 2
INGEST_MARK = "user.ocimodel.ingest"
# fetch(start, length, write): stream bytes [start, start+length) of the blob, calling write(offset, data)
RangeFetch = Callable[[int, int, Callable[[int, memoryview], None]], None]
Slot = Callable[[], AbstractContextManager[object]]


class _LeadCut(Exception):
    """The lead stream reached the first piece: it stops there."""


class RangedIngest:
    """Fills ``partial`` (the full size, sparse at first) with up to ``workers`` connections, each held
    within a ``slot()`` (the node-wide connection limit); see the module docstring. ``on_bytes`` hears
    every byte fetched."""

    def __init__(self, digest: Digest, size: int, partial: Path, state: Path, fetch: RangeFetch, *, workers: int,
                 on_bytes: Callable[[int], None], slot: Slot = contextlib.nullcontext) -> None:
        self.digest, self.size, self.partial, self.state = digest, size, partial, state
        self.fetch, self.workers, self.on_bytes, self.slot = fetch, max(1, workers), on_bytes, slot
        self.filled: list[list[int]] = []  # merged [start, end) ranges on disk, not counting the running lead
        self.hashed = 0  # the hash covers bytes [0, hashed)
        self.hasher = hashlib.new(digest.algorithm)
        self.cond = threading.Condition()
        self.failed: BaseException | None = None
        self.lead_active = False
        self.lead_end = size  # the lead stops here (moved down when the blob is split)
        self.lead_claimed = 0  # the lead has taken bytes [0, lead_claimed) for itself
        self.lead_written = 0
        self.lead_started: float | None = None  # when the lead's first byte arrived
        self.lead_thread = (0, 0)  # the lead's native and Python thread ids
        self.split_into = 0  # how many pieces the rest of the blob was cut into (0: not split)
        self.mark: str | None = None  # the partial file's ingest mark, also in the state file that describes it

    # -- the whole ingest -------------------------------------------------------------------------------
    def run(self) -> int:
        """Fetch what is missing and verify everything; return the bytes that were already there."""
        saved = read_json(self.state)
        if (isinstance(saved, dict) and saved.get("version") == STATE_VERSION and self.partial.exists()
                and self.partial.stat().st_size == self.size and saved.get("mark") == _mark_of(self.partial)):
            self.filled = _merged([[int(s), int(e)] for s, e in saved.get("filled", [])
                                   if 0 <= int(s) < int(e) <= self.size])
        else:
            clear(self.partial, self.state)  # no state may outlive the file it describes
        already = sum(e - s for s, e in self.filled)
        fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self.mark = ingest_mark(fd)
            if self.mark is None:
                self.mark = _set_mark(fd)
            try:
                os.ftruncate(fd, self.size)
            except OSError as exc:
                raise_if_full(exc, f"blob {self.digest}")
                raise
            hasher = threading.Thread(target=self._hash_filled, args=(fd,), name="ranged-hash", daemon=True)
            hasher.start()
            try:
                with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="range") as pool:
                    if self.filled:  # resuming: every gap in pieces, hashed from byte 0 by re-reading
                        futures = [pool.submit(self._fetch_piece, fd, s, e) for s, e in self._gaps()]
                    else:
                        self.lead_active = True
                        futures = [pool.submit(self._lead, fd)]
                        futures += self._probe_then_split(pool, fd)
                    for future in futures:
                        future.result()
            except BaseException as exc:
                self._fail(exc)
                raise
            finally:
                hasher.join()
            if self.failed is not None:
                raise self.failed
            if self.hashed != self.size or self.hasher.hexdigest() != self.digest.hex:
                clear(self.partial, self.state)
                raise IntegrityError(f"blob {self.digest}: content does not match its digest (fetched in ranges)")
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self.state.unlink(missing_ok=True)
        if self.split_into:
            log.info("blob %s: the lead stream was network-bound; %d pieces fetched over %d connections",
                     self.digest, self.split_into, self.workers)
        return already

    def _fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.failed is None:
                self.failed = exc
            self.cond.notify_all()

    # -- the lead stream --------------------------------------------------------------------------------
    def _lead(self, fd: int) -> None:
        windows = WritebackWindows(fd)
        try:
            with self.slot():
                self.fetch(0, self.size, lambda offset, data: self._lead_write(fd, windows, offset, data))
        except _LeadCut:
            pass  # the lead reached the pieces (or the end): its part is written
        except OSError as exc:
            raise_if_full(exc, f"blob {self.digest}")
            raise
        finally:
            with self.cond:
                self.lead_active = False
                self.filled = _merged([*self.filled, [0, self.lead_written]])
                self.cond.notify_all()
        if self.lead_written != self.lead_end:
            raise IntegrityError(f"blob {self.digest}: the stream ended at byte {self.lead_written}")

    def _lead_write(self, fd: int, windows: WritebackWindows, offset: int, data: memoryview) -> None:
        with self.cond:
            if self.failed is not None:
                raise self.failed
            if self.lead_started is None:
                self.lead_started = time.monotonic()
                self.lead_thread = (threading.get_native_id(), threading.get_ident())
                self.cond.notify_all()
            end = self.lead_end
            if offset >= end:
                raise _LeadCut
            view = data[:end - offset]
            self.lead_claimed = offset + len(view)
        pwrite_all(fd, offset, view)
        self.hasher.update(view)
        self.on_bytes(len(view))
        windows.advance(offset + len(view))
        with self.cond:
            self.hashed = self.lead_written = offset + len(view)
            if self.lead_written // STATE_EVERY != offset // STATE_EVERY:
                self._save_state()
        if self.lead_written >= end:
            raise _LeadCut

    def _probe_then_split(self, pool: ThreadPoolExecutor, fd: int) -> list[Future[None]]:
        """Let the lead run alone for a moment; if its thread mostly waited on the network, cut the rest of
        the blob into pieces and return their futures."""
        if self.workers < 2:
            return []
        with self.cond:
            while self.lead_started is None and self.lead_active and self.failed is None:
                self.cond.wait()
            if self.lead_started is None:
                return []
            started_wall, started_busy = time.monotonic(), _busy_seconds(*self.lead_thread)
            deadline = started_wall + PROBE_SECONDS
            while self.lead_active and self.failed is None and (left := deadline - time.monotonic()) > 0:
                self.cond.wait(left)
            if not self.lead_active or self.failed is not None:
                return []
            busy = (_busy_seconds(*self.lead_thread) - started_busy) / max(time.monotonic() - started_wall, 1e-6)
            rest = self.size - self.lead_claimed
            piece = min(PIECE_SIZE, max(MIN_PIECE, -(-rest // (self.workers * 2)) // MIN_PIECE * MIN_PIECE))
            cut = min(self.size, -(-(self.lead_claimed + piece) // MIN_PIECE) * MIN_PIECE)
            log.debug("blob %s: lead stream busy %.0f%% of the probe", self.digest, busy * 100)
            if busy >= BUSY_SHARE or cut >= self.size:
                return []
            self.lead_end = cut
            pieces = [(s, min(s + piece, self.size)) for s in range(cut, self.size, piece)]
            self.split_into = len(pieces)
        return [pool.submit(self._fetch_piece, fd, s, e) for s, e in pieces]

    # -- pieces -----------------------------------------------------------------------------------------
    def _gaps(self) -> list[tuple[int, int]]:
        """The missing ranges of a resumed ingest, cut into pieces for all connections."""
        missing, position = [], 0
        for start, end in [*self.filled, [self.size, self.size]]:
            if start > position:
                missing.append((position, start))
            position = max(position, end)
        total = sum(e - s for s, e in missing)
        piece = min(PIECE_SIZE, max(MIN_PIECE, -(-total // (self.workers * 2)) // MIN_PIECE * MIN_PIECE))
        return [(s, min(s + piece, e)) for a, e in missing for s in range(a, e, piece)]

    def _fetch_piece(self, fd: int, start: int, end: int) -> None:
        written = 0

        def write(offset: int, data: memoryview) -> None:
            nonlocal written
            if self.failed is not None:
                raise self.failed
            pwrite_all(fd, offset, data)
            written += len(data)
            self.on_bytes(len(data))

        try:
            with self.slot():
                self.fetch(start, end - start, write)
        except OSError as exc:
            raise_if_full(exc, f"blob {self.digest}")
            raise
        if written != end - start:
            raise IntegrityError(f"blob {self.digest}: range {start}+{end - start} gave {written} bytes")
        start_writeback(fd, start, end - start)  # no waiting: the final fdatasync before commit makes it durable
        with self.cond:
            self.filled = _merged([*self.filled, [start, end]])
            self._save_state()
            self.cond.notify_all()

    # -- hashing what the pieces filled -----------------------------------------------------------------
    def _covered_from(self, position: int) -> int:
        for start, end in self.filled:
            if start <= position < end:
                return end
        return position

    def _hash_filled(self, fd: int) -> None:
        buffer = bytearray(HASH_BUFFER)
        view = memoryview(buffer)
        while True:
            with self.cond:
                while (self.failed is None and self.hashed < self.size
                       and (self.lead_active or self._covered_from(self.hashed) == self.hashed)):
                    self.cond.wait()
                if self.failed is not None or self.hashed >= self.size:
                    return
                start, upto = self.hashed, self._covered_from(self.hashed)
            while start < upto:
                n = os.preadv(fd, [view[:min(upto - start, HASH_BUFFER)]], start)
                if n <= 0:
                    self._fail(IntegrityError(f"blob {self.digest}: short read while hashing"))
                    return
                self.hasher.update(view[:n])
                start += n
            with self.cond:
                self.hashed = upto

    def _save_state(self) -> None:
        """Replace the state file (caller holds the condition). Not fsynced: it only has to survive the
        process, not the machine, because a resumed ingest hashes every byte again and a wrong one fails
        the digest and starts over."""
        filled = _merged([*self.filled, [0, self.lead_written]]) if self.lead_written else self.filled
        temporary = self.state.with_name(self.state.name + ".tmp")
        temporary.write_text(json.dumps({"version": STATE_VERSION, "mark": self.mark, "filled": filled}))
        os.replace(temporary, self.state)


class RangedView:
    """A ranged ingest under way, seen from another thread or process through its state file: which bytes
    of the partial file are written (not yet verified: the reader checks them)."""

    def __init__(self, partial: Path, state: Path) -> None:
        self.partial, self.state = partial, state

    def filled(self, mark: str | None = None) -> list[list[int]]:
        """The written ``[start, end)`` ranges (empty when the state file is missing or unreadable, or, given
        the ``mark`` of the file a reader opened, when the state describes another file)."""
        saved = read_json(self.state)
        if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION or (
                mark is not None and saved.get("mark") != mark):
            return []
        return [[int(s), int(e)] for s, e in saved.get("filled", [])]

    def on_disk(self, start: int, end: int, mark: str | None = None) -> bool:
        """True when bytes ``[start, end)`` are written (as :meth:`filled`)."""
        return covers(self.filled(mark), start, end)

    def wait_on_disk(self, start: int, end: int, timeout: float, near: int, mark: str | None = None) -> bool:
        """Wait up to ``timeout`` seconds for :meth:`on_disk`, while a written range ends at most ``near``
        bytes before ``start`` or inside ``[start, end)`` (a stream is coming, or is half-way through these
        bytes); else False at once."""
        deadline = time.monotonic() + timeout
        while True:
            filled = self.filled(mark) or [[0, 0]]  # just started: the lead is at byte 0
            if covers(filled, start, end):
                return True
            if time.monotonic() > deadline or not any(start - near < e < end for _, e in filled):
                return False
            time.sleep(VIEW_POLL_SECONDS)


def covers(ranges: list[list[int]], start: int, end: int) -> bool:
    """True when one of the merged ``[start, end)`` ``ranges`` holds all of ``[start, end)``."""
    return any(s <= start and end <= e for s, e in ranges)


def _busy_seconds(native_id: int, ident: int) -> float:
    """Seconds a thread of this process has run or waited for a CPU (runnable, not running): a thread
    starved of CPU by other work is busy, not waiting on the network. Where the kernel keeps no schedstat,
    run time alone."""
    try:
        ran, runnable, _ = Path(f"/proc/self/task/{native_id}/schedstat").read_text().split()
        return (int(ran) + int(runnable)) / 1e9
    except (OSError, ValueError):
        return time.clock_gettime(time.pthread_getcpuclockid(ident))


def _merged(ranges: list[list[int]]) -> list[list[int]]:
    result: list[list[int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if result and start <= result[-1][1]:
            result[-1][1] = max(result[-1][1], end)
        else:
            result.append([start, end])
    return result


def ingest_mark(fd: int) -> str | None:
    """The ingest mark of an open partial file or committed blob; None when it has none (written before
    marks existed, by a whole-blob ingest, or on a filesystem without user extended attributes)."""
    try:
        mark = os.getxattr(fd, INGEST_MARK).decode("ascii", errors="replace")
    except OSError:
        return None
    return mark if len(mark) == 32 and all(c in "0123456789abcdef" for c in mark) else None


def _mark_of(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return ingest_mark(fd)
    finally:
        os.close(fd)


def _set_mark(fd: int) -> str | None:
    mark = uuid.uuid4().hex
    try:
        os.setxattr(fd, INGEST_MARK, mark.encode())
    except OSError as exc:  # ENOTSUP: lazy mounts then hash what they serve of it
        log.debug("no ingest mark on a partial file: %s", exc)
        return None
    return mark


def clear(partial: Path, state: Path) -> None:
    """Forget a ranged ingest: its state first, so that no state file ever describes a file it did not."""
    for path in (state, partial):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
