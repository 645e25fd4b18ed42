"""Small filesystem helpers: file locks, atomic writes, fsync of directories, removal of read-only trees."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelcache.errors import StoreFull


@contextlib.contextmanager
def file_lock(path: Path, *, shared: bool = False, blocking: bool = True) -> Iterator[bool]:
    """Hold an flock on ``path`` (created if missing). Works across threads and processes.

    Yields False (and holds nothing) when ``blocking`` is False and the lock is taken.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise_if_full(exc, f"lock {path.name}")
        raise
    try:
        flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise_if_full(exc, f"writing {path.name}")
        raise
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise_if_full(exc, f"writing {path.name}")
        raise


def read_json(path: Path) -> Any:
    """Load JSON from ``path``; None if it does not exist or is unreadable."""
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def raise_if_full(exc: OSError, what: str) -> None:
    """Turn ENOSPC/EDQUOT into :class:`StoreFull`."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreFull(f"{what}: no space left in the cache ({os.strerror(exc.errno)})") from None


def _make_writable_for_removal(root: Path) -> None:
    """Give directories write bits back so a tree can be deleted."""
    for dirpath, dirnames, _ in os.walk(root):
        with contextlib.suppress(OSError):
            os.chmod(dirpath, 0o755)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o755)


def remove_tree(path: Path) -> None:
    """Delete a read-only tree (directories are made writable first)."""
    if not os.path.lexists(path):
        return
    _make_writable_for_removal(path)
    shutil.rmtree(path, ignore_errors=False)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` back to disk without waiting (sync_file_range)."""
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def wait_writeback(fd: int, offset: int, length: int) -> None:
    """Start writeback of the range and wait until it is on disk."""
    _libc.sync_file_range(fd, offset, length,
                          SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER)


WRITE_BEHIND_WINDOW = 16 << 20
WRITE_BEHIND_DEPTH = 4  # windows whose writeback may still run while the writer goes on


class WritebackWindows:
    """For a file written front to back: start writeback of each finished window at once and wait for the
    one WRITE_BEHIND_DEPTH windows before it, so dirty pages stay bounded (at most about
    (WRITE_BEHIND_DEPTH + 1) x WRITE_BEHIND_WINDOW = 80 MiB per stream), a slow moment of the disk does not
    stall the network at once, and the final fsync has little left to do."""

    def __init__(self, fd: int, position: int = 0) -> None:
        self.fd = fd
        self.restart(position)

    def restart(self, position: int) -> None:
        """The writer moved to ``position`` (a resumed or restarted file)."""
        self.flushed = position - position % WRITE_BEHIND_WINDOW

    def advance(self, position: int) -> None:
        """The file is written up to ``position``."""
        while position - self.flushed >= WRITE_BEHIND_WINDOW:
            start_writeback(self.fd, self.flushed, WRITE_BEHIND_WINDOW)
            behind = self.flushed - WRITE_BEHIND_DEPTH * WRITE_BEHIND_WINDOW
            if behind >= 0:
                wait_writeback(self.fd, behind, WRITE_BEHIND_WINDOW)
            self.flushed += WRITE_BEHIND_WINDOW


def pwrite_all(fd: int, offset: int, data: memoryview) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
