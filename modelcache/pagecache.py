"""Page-cache tools, like vmtouch: residency (mmap + mincore), warming (sequential reads into a reused
buffer, verified by mincore), eviction (POSIX_FADV_DONTNEED) and locking (mlock of a mapping this
process keeps)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import stat
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from modelcache.errors import Kind, ModelCacheError

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
READ_CHUNK = 8 << 20
RANGE = 256 << 20
PROT_READ, MAP_SHARED = 0x1, 0x01
MAP_FAILED = ctypes.c_void_p(-1).value
WINDOW = 256 << 20  # map and populate large files in windows so address space stays bounded

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@dataclass
class FileResidency:
    """Pages of one file and how many are in page cache."""

    path: str
    size: int
    pages: int
    resident_pages: int

    @property
    def resident_bytes(self) -> int:
        """Resident bytes (the last page counted only up to the file size)."""
        return min(self.resident_pages * PAGE, self.size)


@dataclass
class Report:
    """Residency of a set of files, and what a warm or evict did."""

    files: list[FileResidency] = field(default_factory=list)
    skipped_bytes: int = 0
    message: str = ""

    @property
    def total_bytes(self) -> int:
        """Bytes of all files."""
        return sum(f.size for f in self.files)

    @property
    def resident_bytes(self) -> int:
        """Bytes in page cache."""
        return sum(f.resident_bytes for f in self.files)

    @property
    def pages(self) -> int:
        """Pages of all files."""
        return sum(f.pages for f in self.files)

    @property
    def resident_pages(self) -> int:
        """Resident pages of all files."""
        return sum(f.resident_pages for f in self.files)

    def to_json(self) -> dict[str, object]:
        """For ``--json``."""
        return {"files": len(self.files), "total_bytes": self.total_bytes, "resident_bytes": self.resident_bytes,
                "pages": self.pages, "resident_pages": self.resident_pages, "skipped_bytes": self.skipped_bytes,
                "message": self.message,
                "per_file": [{"path": f.path, "size": f.size, "pages": f.pages, "resident_pages": f.resident_pages}
                             for f in self.files]}


def regular_files(paths: Iterable[Path]) -> list[Path]:
    """Every regular file under ``paths`` (symlinks are not followed; hardlinked inodes listed once)."""
    seen: set[tuple[int, int]] = set()
    result: list[Path] = []
    for root in paths:
        candidates: Iterator[Path] = iter([root]) if root.is_file() else (p for p in sorted(root.rglob("*")))
        for path in candidates:
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                result.append(path)
    return result


class _Mapping:
    """A read-only shared mapping of part of a file, made with libc so its address is known."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.length = length
        address = _libc.mmap(None, length, PROT_READ, MAP_SHARED, fd, offset)
        if address in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.address: int = address

    def close(self) -> None:
        _libc.munmap(self.address, self.length)


def _windows(size: int) -> Iterator[tuple[int, int]]:
    offset = 0
    while offset < size:
        yield offset, min(WINDOW, size - offset)
        offset += WINDOW


def residency(path: Path) -> FileResidency:
    """Which pages of ``path`` are in page cache (mincore on a fresh mapping)."""
    size = path.stat().st_size
    pages = (size + PAGE - 1) // PAGE
    resident = 0
    if size:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for offset, length in _windows(size):
                mapping = _Mapping(fd, offset, length)
                try:
                    count = (length + PAGE - 1) // PAGE
                    vector = (ctypes.c_ubyte * count)()
                    if _libc.mincore(mapping.address, length, vector) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"mincore {path}: {os.strerror(err)}")
                    resident += sum(1 for v in bytes(vector) if v & 1)
                finally:
                    mapping.close()
        finally:
            os.close(fd)
    return FileResidency(str(path), size, pages, resident)


def report(paths: Iterable[Path]) -> Report:
    """Residency of every regular file under ``paths``."""
    return Report([residency(p) for p in regular_files(paths)])


def _populate(job: tuple[Path, int, int]) -> None:
    """Read one range of a file through a reused buffer. Measured here, sequential reads beat
    MADV_POPULATE_READ on a mapping: pages brought in by read() readahead come in large folios, and
    later reads of them run about 3x faster than reads of pages faulted in through a mapping."""
    path, offset, length = job
    buffer = memoryview(bytearray(READ_CHUNK))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_SEQUENTIAL)
        end = offset + length
        while offset < end:
            n = os.preadv(fd, [buffer[: min(READ_CHUNK, end - offset)]], offset)
            if not n:
                break
            offset += n
    finally:
        os.close(fd)


def _ranges(files: Iterable[Path]) -> list[tuple[Path, int, int]]:
    """Split files into ranges of at most RANGE bytes, so several readers keep the disk busy."""
    jobs = []
    for path in files:
        size = path.stat().st_size
        for offset in range(0, size, RANGE):
            jobs.append((path, offset, min(RANGE, size - offset)))
    return jobs


def warm_budget(share: float) -> int:
    """Bytes a warm may bring in: ``share`` of the memory available now."""
    return int(psutil.virtual_memory().available * share)


def warm(paths: Iterable[Path], *, memory_share: float = 0.5, threads: int = 4) -> Report:
    """Bring files into page cache, largest first, within ``memory_share`` of available memory; then
    verify with mincore. Files over the budget are skipped and the report says so."""
    files = regular_files(paths)
    before = {str(f): residency(f) for f in files}
    budget = warm_budget(memory_share)
    chosen: list[Path] = []
    skipped = 0
    for path in sorted(files, key=lambda p: -before[str(p)].size):
        missing = before[str(path)].size - before[str(path)].resident_bytes
        if missing <= budget:
            budget -= missing
            chosen.append(path)
        else:
            skipped += missing
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(_populate, _ranges(chosen)))
    result = report(files)
    result.skipped_bytes = skipped
    if skipped:
        result.message = (f"skipped {skipped} bytes: warming them would exceed {memory_share:.0%} of available "
                          f"memory")
        log.warning(result.message)
    return result


def evict(paths: Iterable[Path]) -> Report:
    """Drop files from page cache (POSIX_FADV_DONTNEED; dirty or mapped pages may stay)."""
    files = regular_files(paths)
    for path in files:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return report(files)


class LockedFiles:
    """Files mapped and mlocked by this process until :meth:`release` (the agent holds these)."""

    def __init__(self, paths: Iterable[Path], *, max_bytes: int | None = None) -> None:
        self._mappings: list[_Mapping] = []
        self.bytes = 0
        files = list(regular_files(paths))
        total = sum(path.stat().st_size for path in files)
        if max_bytes is not None and total > max_bytes:
            raise ModelCacheError(f"locking {total} bytes would exceed the memory share for page cache "
                                  f"({max_bytes} bytes now)", kind=Kind.RESOURCE_EXHAUSTED)
        try:
            for path in files:
                size = path.stat().st_size
                if not size:
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    for offset, length in _windows(size):
                        mapping = _Mapping(fd, offset, length)
                        self._mappings.append(mapping)
                        if _libc.mlock(mapping.address, length) != 0:
                            err = ctypes.get_errno()
                            raise OSError(err, f"mlock {path}: {os.strerror(err)} (raise RLIMIT_MEMLOCK or run "
                                               f"with CAP_IPC_LOCK)")
                        self.bytes += length
                finally:
                    os.close(fd)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Unlock and unmap everything."""
        for mapping in self._mappings:
            _libc.munlock(mapping.address, mapping.length)
            mapping.close()
        self._mappings.clear()
        self.bytes = 0
