"""Filesystem operations beneath an open directory that never follow a symbolic link: a path is opened one
component at a time relative to its parent's descriptor with O_NOFOLLOW, and every entry is created, removed
or linked relative to the descriptor of its directory. A link planted by a layer can be neither written
through nor walked through, whatever its target and however long the path; no path handed to the kernel is
longer than one name."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from modelcache.errors import UnsafeContent
from modelcache.fsutil import raise_if_full

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
COPY_SIZE = 1 << 20
Listing = list[tuple[str, os.stat_result]]
# what hostile names, links and nesting provoke: a link or file where a directory should be, a name too long,
# too many links to one file, an entry that is already there
_REFUSED = {errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EEXIST, errno.EMLINK,
            errno.EXDEV, errno.ENOTEMPTY, errno.EINVAL}


def _name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        raise UnsafeContent(f"{name!r} is not a file name")
    return name


def _names(relpath: str) -> list[str]:
    return [_name(part) for part in relpath.split("/") if part]


def kind_of_mode(mode: int) -> str:
    """"dir", "file", "symlink" or "other" for a ``st_mode``."""
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "symlink" if stat.S_ISLNK(mode) else "other"


def open_path(path: Path) -> int:
    """Open a directory the caller trusts (a place in the store), not a link."""
    return os.open(path, DIR_FLAGS)


def open_dir(base: int, relpath: str = "", *, create: bool = False) -> int:
    """Open directory ``relpath`` beneath ``base``, one component at a time, never through a link (ELOOP or
    ENOTDIR); ``create`` makes the missing ones."""
    fd = os.open(".", DIR_FLAGS, dir_fd=base)
    try:
        for part in _names(relpath):
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def opened(base: int, relpath: str = "", *, create: bool = False) -> Iterator[int]:
    """:func:`open_dir`, closed on leaving."""
    fd = open_dir(base, relpath, create=create)
    try:
        yield fd
    finally:
        os.close(fd)


def kind(dir_fd: int, name: str) -> str | None:
    """What ``name`` in ``dir_fd`` is (:func:`kind_of_mode`), not following a link; None if absent."""
    try:
        return kind_of_mode(os.stat(_name(name), dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return None


def kind_at(base: int, relpath: str) -> str | None:
    """What is at ``relpath`` beneath ``base``; "symlink" or "file" for a path that goes through one."""
    parent, _, name = relpath.rpartition("/")
    try:
        with opened(base, parent) as fd:
            return kind(fd, name)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink"
        if exc.errno == errno.ENOTDIR:
            return "file"
        raise


def listing(dir_fd: int) -> Listing:
    """The entries of ``dir_fd`` with their lstat, sorted by name."""
    return [(name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False)) for name in sorted(os.listdir(dir_fd))]


def walk(base: int) -> Iterator[tuple[str, int, Listing]]:
    """Every directory beneath ``base`` (``""`` first) with a descriptor open while the caller holds it and its
    listing; iterative, so neither depth nor open descriptors grow with nesting."""
    pending = [""]
    while pending:
        relpath = pending.pop()
        with opened(base, relpath) as fd:
            entries = listing(fd)
            yield relpath, fd, entries
        pending.extend(f"{relpath}/{n}" if relpath else n for n, st in reversed(entries) if stat.S_ISDIR(st.st_mode))


def remove(dir_fd: int, name: str) -> None:
    """Remove ``name`` from ``dir_fd`` (a directory with all beneath it), never following a link."""
    if kind(dir_fd, name) != "dir":
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
        return
    pending = [name]
    while pending:
        relpath = pending[-1]
        with opened(dir_fd, relpath) as fd:
            os.fchmod(fd, 0o700)
            subdirs = []
            for child, st in listing(fd):
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append(f"{relpath}/{child}")
                else:
                    os.unlink(child, dir_fd=fd)
        if subdirs:
            pending.extend(subdirs)
            continue
        parent, _, base = relpath.rpartition("/")
        with opened(dir_fd, parent) as fd:
            os.rmdir(base, dir_fd=fd)
        pending.pop()


def remove_path(path: Path) -> None:
    """Remove ``path`` (in a directory the caller trusts) and everything beneath it, never following a link."""
    try:
        parent = open_path(path.parent)
    except FileNotFoundError:
        return
    try:
        remove(parent, path.name)
    finally:
        os.close(parent)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` at the current offset."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def new_file(dir_fd: int, name: str) -> int:
    """Create ``name`` in ``dir_fd`` for writing, replacing what is there (never writing through a link)."""
    remove(dir_fd, name)
    return os.open(_name(name), NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)


def link_or_copy(src_dir: int, src_name: str, dst_dir: int, dst_name: str) -> None:
    """Hardlink regular file ``src_name`` as ``dst_name`` (replacing what is there), or copy it when its link
    count is exhausted or the two are on different filesystems."""
    remove(dst_dir, dst_name)
    try:
        os.link(_name(src_name), _name(dst_name), src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)
        return
    except OSError as exc:
        if exc.errno not in (errno.EMLINK, errno.EXDEV):
            raise
    source = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        target = new_file(dst_dir, dst_name)
        try:
            while chunk := os.read(source, COPY_SIZE):
                write_all(target, chunk)
            os.fchmod(target, 0o444)
        finally:
            os.close(target)
    finally:
        os.close(source)


@contextlib.contextmanager
def refusing(what: str) -> Iterator[None]:
    """Turn what hostile names, links and nesting provoke (ELOOP, ENOTDIR, ENAMETOOLONG, EMLINK, EXDEV, ...)
    into one-line :class:`UnsafeContent`; a full disk into :class:`StoreFull`."""
    try:
        yield
    except OSError as exc:
        raise_if_full(exc, what)
        if exc.errno in _REFUSED:
            name = f" ({str(exc.filename)[:120]!r})" if exc.filename else ""
            raise UnsafeContent(f"{what}: {os.strerror(exc.errno or 0)}{name}") from None
        raise
