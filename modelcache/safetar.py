"""Extraction of tar layers from a registry, treating every byte as hostile.

tarfile's ``data`` filter rejects absolute paths, escaping members and links, and device files;
on top of it this refuses setuid/setgid bits (instead of silently clearing them), oversized
pax/GNU headers, and more output than a decompression-bomb limit allows.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from modelcache.errors import IntegrityError, UnsafeContent
from modelcache.mediatypes import Compression
from modelcache.paths import safe_relpath

MAX_HEADER_BYTES = 1 << 20
MAX_MEMBERS = 2_000_000
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ZSTD_MAX_WINDOW = 1 << 27


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses pax and GNU long-name headers larger than MAX_HEADER_BYTES before reading them."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        header_types = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                        tarfile.SOLARIS_XHDTYPE)
        if self.type in header_types and self.size > MAX_HEADER_BYTES:
            raise UnsafeContent(f"tar header of {self.size} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
        return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]


class _LimitedReader:
    """A read-only stream that fails once more than ``limit`` bytes have come out of it."""

    def __init__(self, inner: IO[bytes] | Any, limit: int, what: str) -> None:
        self.inner = inner
        self.limit = limit
        self.total = 0
        self.what = what

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.inner.read(size if size is not None and size >= 0 else 1 << 20)
        self.total += len(data)
        if self.total > self.limit:
            raise UnsafeContent(f"{self.what}: expands to more than {self.limit} bytes (decompression bomb?)")
        return data


@dataclass
class ExtractStats:
    """What an extraction produced."""

    files: int = 0
    bytes: int = 0


def _open_decompressed(raw: IO[bytes], compression: Compression) -> Any:
    if compression is Compression.TAR_GZIP:
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression is Compression.TAR_ZSTD:
        return zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(raw, read_size=1 << 20)
    return raw


def _strip_prefix(name: str, prefix: str) -> tuple[str | None, bool]:
    """Map a member name into the exposed sub-tree.

    Returns ``(new_name, clears_all)``: new_name is None for members outside the prefix;
    clears_all is True for a whiteout that removes the prefix itself or one of its ancestors.
    """
    if not prefix:
        return name, False
    if name == prefix:
        return "", False
    if name.startswith(prefix + "/"):
        return name[len(prefix) + 1:], False
    directory, base = posixpath.split(name)
    ancestors = prefix.split("/")
    for depth in range(len(ancestors)):
        parent = "/".join(ancestors[:depth])
        if directory == parent and (base == OPAQUE or base == WHITEOUT + ancestors[depth]):
            return None, True
    return None, False


def _refuse_special(member: tarfile.TarInfo, what: str) -> None:
    if member.mode & (stat.S_ISUID | stat.S_ISGID):
        raise UnsafeContent(f"{what}: {member.name!r} has the setuid/setgid bit")
    if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        raise UnsafeContent(f"{what}: {member.name!r} is a device or FIFO")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise UnsafeContent(f"{what}: {member.name!r} has unsupported tar type {member.type!r}")


@dataclass(frozen=True)
class Member:
    """A tar member that passed every check, renamed into the exposed sub-tree and through tarfile's data
    filter. ``opaque_root``: a whiteout of the sub-tree or an ancestor (what lower layers hold is gone)."""

    info: tarfile.TarInfo
    opaque_root: bool = False


def open_tar(stream: IO[bytes] | Any, *, streaming: bool) -> tarfile.TarFile:
    """A tarfile reader with bounded pax/GNU headers: ``streaming`` for a pipe (extraction), else over a
    seekable file whose data is never read (the lazy index reads only headers)."""
    return tarfile.open(fileobj=stream, mode="r|" if streaming else "r:",  # type: ignore[call-overload, no-any-return]
                        tarinfo=_BoundedTarInfo, copybufsize=1 << 20)


def checked_members(archive: tarfile.TarFile, *, prefix: str, dest: str, max_bytes: int, what: str
                    ) -> Iterator[Member]:
    """The members of ``archive`` under ``prefix``, each checked (no escapes, devices, FIFOs, setuid or
    unknown types; links inside; at most ``max_bytes`` of file data) and renamed relative to the prefix;
    ``dest`` is the directory tarfile's data filter checks against (real or not). One set of rules for
    extraction and for the lazy index."""
    total = 0
    for count, member in enumerate(archive):
        if count >= MAX_MEMBERS:
            raise UnsafeContent(f"{what}: more than {MAX_MEMBERS} entries")
        if member.name.startswith("/") or ".." in member.name.split("/"):
            raise UnsafeContent(f"{what}: member {member.name!r} escapes the tree")
        name = "/".join(p for p in member.name.split("/") if p not in ("", "."))
        mapped, clears_all = _strip_prefix(name, prefix)
        if clears_all:
            yield Member(tarfile.TarInfo(OPAQUE), opaque_root=True)
            continue
        if mapped is None or mapped == "":
            continue
        _refuse_special(member, what)
        mapped = safe_relpath(mapped, what)
        if member.islnk():
            link = "/".join(p for p in member.linkname.split("/") if p not in ("", "."))
            target, _ = _strip_prefix(link, prefix)
            if target is None or target == "" or target.startswith("..") or member.linkname.startswith("/"):
                raise UnsafeContent(f"{what}: hard link {member.name!r} points outside the tree ({member.linkname!r})")
            member = member.replace(linkname=target, deep=False)
        member = tarfile.data_filter(member.replace(name=mapped, deep=False), dest)
        total += member.size if member.isreg() else 0
        if total > max_bytes:
            raise UnsafeContent(f"{what}: expands to more than {max_bytes} bytes (decompression bomb?)")
        yield Member(member)


@contextmanager
def tar_errors(what: str, compression: Compression) -> Iterator[None]:
    """Map what reading a hostile tar can raise to this package's errors."""
    try:
        yield
    except UnsafeContent:
        raise
    except tarfile.FilterError as exc:
        raise UnsafeContent(f"{what}: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as exc:
        raise IntegrityError(f"{what}: not a valid {compression.value} archive ({exc})") from None
    except OSError as exc:
        if exc.errno in (36,):  # ENAMETOOLONG
            raise UnsafeContent(f"{what}: a name is too long for the filesystem") from None
        raise


def extract_tar(blob: Path, compression: Compression, dest: Path, *, max_bytes: int, prefix: str = "",
                what: str = "layer") -> ExtractStats:
    """Extract the tar ``blob`` into the empty directory ``dest``; only members under ``prefix``.

    Whiteouts are kept as empty marker files for the tree assembler; a whiteout of the prefix or
    one of its ancestors becomes an opaque marker at the root of ``dest``.
    """
    prefix = safe_relpath(prefix, what) if prefix.strip("/") else ""
    dest.mkdir(parents=True, exist_ok=True)
    stats = ExtractStats()
    real_dest = os.path.realpath(dest)
    with tar_errors(what, compression), open(blob, "rb") as raw:
        stream = _LimitedReader(_open_decompressed(raw, compression), max_bytes, what)
        with open_tar(stream, streaming=True) as archive:
            for member in checked_members(archive, prefix=prefix, dest=real_dest, max_bytes=max_bytes, what=what):
                _extract_member(archive, member, dest, real_dest, stats)
    _drop_write_bits(dest)
    return stats


def _extract_member(archive: tarfile.TarFile, member: Member, dest: Path, real_dest: str,
                    stats: ExtractStats) -> None:
    if member.opaque_root:
        (dest / OPAQUE).touch()
        return
    info = member.info
    stats.bytes += info.size if info.isreg() else 0
    target_path = dest / info.name
    if os.path.lexists(target_path) and not (info.isdir() and target_path.is_dir() and
                                              not target_path.is_symlink()):
        if target_path.is_dir() and not target_path.is_symlink():
            shutil.rmtree(target_path)
        else:
            target_path.unlink()
    archive.extract(info, real_dest, set_attrs=info.isdir() is False, filter="fully_trusted")
    if info.isreg() or info.islnk():
        stats.files += 1


def _drop_write_bits(root: Path) -> None:
    """Files keep their read/exec bits, lose write; directories become 0555."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, (st.st_mode & 0o555) | 0o444)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o555)
    os.chmod(root, 0o555)
