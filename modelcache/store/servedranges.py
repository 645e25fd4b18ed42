"""The integrity floor of lazy mounts without a chunk index, kept on disk so that it survives restarts: every
range of a blob a lazy server serves before the blob is verified is recorded first (``<root>/lazy/served/
<alg>-<hex>.ranges``, appended and fdatasynced before the bytes are returned), and whoever commits the blob
(the server's download, the plugin's or the agent's pull, a later pull that finds it committed) checks the
records against the verified blob. Two kinds of line:

- ``start end sha256``: bytes fetched by range (or read from a partial file without an ingest mark), compared
  by hash with the same bytes of the blob;
- ``live <mark>``: bytes read from the partial file of a running download whose ingest mark is ``<mark>``
  (one line per file per server, whatever it serves of it). A download never rewrites a byte it has listed
  as written, so those bytes are the blob's exactly when the committed blob carries the same mark; a blob
  committed from any other file means they came from a download that failed its digest;
- ``retired <mark>``: a partial file that was discarded without failing (its ranged download fell back to one
  stream, or gc removed it after a crash) had what it listed hashed into range lines first, which then
  stand for its ``live`` lines.

Appenders hold the blob's record lock shared from their write to its fdatasync, a settler holds it
exclusively from reading the records to removing them, so no line is written into a file being settled.

A mismatch leaves a per-blob marker (``<alg>-<hex>.broken.json``) that every lazy server of the blob, and the
plugin, turn into EIO, a verdict and an Event.

No record is lost to a race: a recorder that finds the blob committed after appending settles it itself,
and a settler removes the record file only after comparing it and writing any marker."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from modelcache.digest import Digest
from modelcache.fsutil import atomic_write_json, file_lock, raise_if_full, read_json
from modelcache.store.rangedingest import ingest_mark

log = logging.getLogger(__name__)
READ_SIZE = 4 << 20
RETIRE_UNIT = 64 << 20  # a retired partial file's listed bytes are hashed in lines of at most this


class ServedRanges:
    """Records of served ranges and verdicts per blob, under ``<root>/lazy/served``."""

    def __init__(self, root: Path, blob_path: Callable[[Digest], Path]) -> None:
        self.dir = root / "lazy" / "served"
        self.blob_path = blob_path

    def _records(self, digest: Digest) -> Path:
        return self.dir / f"{digest.algorithm}-{digest.hex}.ranges"

    def _marker(self, digest: Digest) -> Path:
        return self.dir / f"{digest.algorithm}-{digest.hex}.broken.json"

    def _lock(self, digest: Digest) -> Path:
        return self.dir / f"{digest.algorithm}-{digest.hex}.lock"

    def record(self, digest: Digest, start: int, data: bytes | memoryview) -> str | None:
        """Record that ``data`` at ``start`` of the unverified blob ``digest`` is about to be served; return
        the reason the blob's served bytes are known wrong (then serve nothing), else None. fdatasync: one per
        range (4 MiB), so that a node crash cannot lose the record of bytes a reader already has."""
        return self._append(digest, f"{start} {start + len(data)} {hashlib.sha256(data).hexdigest()}\n")

    def record_live(self, digest: Digest, mark: str) -> str | None:
        """Record that bytes of the running download of ``digest`` whose partial file carries ingest mark
        ``mark`` are about to be served (once per file: the mark covers whatever is read of it); as
        :meth:`record`."""
        return self._append(digest, f"live {mark}\n")

    def retire(self, digest: Digest, fd: int, mark: str, listed: list[list[int]]) -> None:
        """Partial file ``fd`` of ``digest``, with ingest ``mark`` and bytes ``listed`` as written, is discarded
        although it did not fail: when something of it was served (a ``live`` line), hash what it listed into
        range lines that stand for that line from now on."""
        try:
            lines = self._records(digest).read_text().splitlines()
        except FileNotFoundError:
            return
        if f"live {mark}" not in lines or not listed:  # nothing listed known: its line stays, a verdict
            return
        text = "".join(f"{start} {min(start + RETIRE_UNIT, end)} {_sha(fd, start, min(start + RETIRE_UNIT, end))}\n"
                       for s, end in listed for start in range(s, end, RETIRE_UNIT))
        self._append(digest, text + f"retired {mark}\n", settle=False)

    def _append(self, digest: Digest, text: str, *, settle: bool = True) -> str | None:
        line = text.encode()
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            with file_lock(self._lock(digest), shared=True):
                fd = os.open(self._records(digest), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, line)  # one O_APPEND write: whole, never interleaved with another process's
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise_if_full(exc, f"recording a served range of {digest}")
            raise
        if not settle:
            return None
        if self.blob_path(digest).exists():  # committed meanwhile: its committer may have read the records before
            return self.settle(digest)
        return self.verdict(digest)

    def settle(self, digest: Digest) -> str | None:
        """Compare the recorded ranges of committed blob ``digest`` with it, leave a marker on a mismatch, drop
        the records; return the blob's verdict (the reason its served bytes were wrong, or None)."""
        records = self._records(digest)
        if not records.exists():
            return self.verdict(digest)
        with file_lock(self._lock(digest)):
            return self._settle_locked(digest, records)

    def _settle_locked(self, digest: Digest, records: Path) -> str | None:
        try:
            lines = records.read_text().splitlines()
        except FileNotFoundError:
            return self.verdict(digest)
        try:
            blob = os.open(self.blob_path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return self.verdict(digest)  # not committed: compared when it is
        try:
            ranges, marks = _parse(lines)
            wrong = sorted({(start, end) for start, end, want in ranges if _sha(blob, start, end) != want})
            committed_mark = ingest_mark(blob)
            stray = sorted(mark for mark in marks if mark != committed_mark)
        finally:
            os.close(blob)
        reason = ""
        if wrong:
            reason = (f"bytes served before the pull finished differ from the verified blob (blob {digest}, "
                      f"ranges {', '.join(f'{s}-{e}' for s, e in wrong[:8])}): the registry or a cache in front of "
                      f"it answered wrongly, and readers may have read wrong weights")
        elif stray:
            reason = (f"bytes served before the pull finished came from a download of blob {digest} that failed its "
                      f"digest and was discarded ({len(stray)} download(s)): the registry or a cache in front of it "
                      f"answered wrongly, and readers may have read wrong weights")
        if reason:
            log.error("%s", reason)
            if self.verdict(digest) is None:
                atomic_write_json(self._marker(digest), {"broken": reason, "at": time.time()})
        records.unlink(missing_ok=True)
        return self.verdict(digest)

    def verdict(self, digest: Digest) -> str | None:
        """Why the served bytes of ``digest`` were wrong, or None."""
        data = read_json(self._marker(digest))
        return str(data["broken"]) if isinstance(data, dict) and data.get("broken") else None

    def verdict_since(self, digest: Digest, since: float) -> str | None:
        """:meth:`verdict`, when it was reached after ``since`` (a volume published later never served
        unverified bytes of the blob: it was committed by then)."""
        data = read_json(self._marker(digest))
        if isinstance(data, dict) and data.get("broken") and float(data.get("at", 0)) >= since:
            return str(data["broken"])
        return None

    def forget(self, digest: Digest) -> None:
        """The blob is removed from the cache: drop its records and verdict."""
        for path in (self._records(digest), self._marker(digest), self._lock(digest)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _parse(lines: list[str]) -> tuple[list[tuple[int, int, str]], set[str]]:
    """The hashed ranges and the ingest marks (of ``live`` lines not retired) of a record file."""
    parsed: list[tuple[int, int, str]] = []
    marks: set[str] = set()
    retired: set[str] = set()
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            parsed.append((int(parts[0]), int(parts[1]), parts[2]))
        elif len(parts) == 2 and parts[0] in ("live", "retired"):
            (marks if parts[0] == "live" else retired).add(parts[1])
        elif line.strip():  # a torn line can only come from a crash mid-write, before its bytes were served
            log.warning("ignoring a torn served-range record: %r", line[:120])
    return parsed, marks - retired


def _sha(fd: int, start: int, end: int) -> str:
    digest = hashlib.sha256()
    position = start
    while position < end:
        data = os.pread(fd, min(READ_SIZE, end - position), position)
        if not data:
            break
        digest.update(data)
        position += len(data)
    return digest.hexdigest()
