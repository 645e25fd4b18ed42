"""Reading tar layers from a registry, every byte treated as hostile, and the one set of rules
(:func:`checked_members`) that extraction (:mod:`modelcache.assemble.extract`) and the lazy index both apply.

tarfile only parses here: headers (pax and GNU long names bounded, a bad header refused rather than taken
for the end) and file data out of the stream (decompression bounded by the model's budget). There is no data
filter to trust: the rules below decide, and links come last, once the whole layer has shown they stay inside.
"""

from __future__ import annotations

import gzip
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Self

import zstandard

from modelcache.assemble import fdtree
from modelcache.assemble.paths import safe_relpath
from modelcache.assemble.treerules import Budget, check_depth, check_symlink, walk_tree
from modelcache.errors import IntegrityError, UnsafeContent
from modelcache.registry.mediatypes import Compression

MAX_HEADER_BYTES = 1 << 20
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ZSTD_MAX_WINDOW = 1 << 27
# header errors tarfile takes for the end of the archive after its first member (typeshed does not list them)
_BAD_HEADER: tuple[type[Exception], ...] = (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)  # type: ignore[attr-defined]


MAX_MEMBER_BYTES = 1 << 44  # no model layer member is larger (16 TiB); larger is a forged size field
_MAX_PAX_LENGTH_DIGITS = 7  # a pax record is at most MAX_HEADER_BYTES long
_MAX_PAX_NUMBER = 32  # characters of a numeric pax value (size, mtime, uid, ...)
_PAX_NUMBER_FIELDS = frozenset({"size", "mtime", "atime", "ctime", "uid", "gid"})


def _pax_records(buf: bytes) -> list[tuple[bytes, bytes]]:
    """The ``length keyword=value\\n`` records of a pax header, in one pass over it (tarfile's regexes are
    quadratic on digit runs, CVE-2024-6232, on the Pythons that lack the fix); a malformed record is refused."""
    records = []
    pos = 0
    while pos < len(buf):
        space = buf.find(b" ", pos, pos + _MAX_PAX_LENGTH_DIGITS + 1)
        digits = buf[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise UnsafeContent(f"malformed pax header record at byte {pos} (no length field)")
        end = pos + int(digits)
        if end <= space + 1 or end > len(buf) or buf[end - 1:end] != b"\n":
            raise UnsafeContent(f"malformed pax header record at byte {pos} (length {int(digits)})")
        keyword, equals, value = buf[space + 1:end - 1].partition(b"=")
        if not equals or not keyword:
            raise UnsafeContent(f"malformed pax header record at byte {pos} (no keyword=value)")
        records.append((keyword, value))
        pos = end
    return records


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses, before tarfile acts on them: pax and GNU long-name headers larger than MAX_HEADER_BYTES, pax
    global headers, GNU sparse members and pax keys, sizes below zero or over MAX_MEMBER_BYTES, malformed pax
    records (parsed here, linearly), and a bad header after the first one (tarfile would take it for the end
    and skip what follows without a word)."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except _BAD_HEADER as exc:
            if not tarfile_.offset:
                raise
            raise UnsafeContent(f"the tar header at offset {tarfile_.offset} is invalid ({exc}); refusing the "
                                f"layer rather than skipping the rest of it") from None

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        _check_size(self)
        if self.type == tarfile.XGLTYPE:
            raise UnsafeContent(f"{self.name[:200]!r} is a pax global header; they are refused")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise UnsafeContent(f"{self.name[:200]!r} is a GNU sparse member; sparse members are refused")
        header_types = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type in header_types and self.size > MAX_HEADER_BYTES:
            raise UnsafeContent(f"tar header of {self.size} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
        return super()._proc_member(tarfile_)  # type: ignore[misc, no-any-return]

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """An extended header, as tarfile reads one, with its records parsed by :func:`_pax_records`."""
        records = _pax_records(tarfile_.fileobj.read(self._block(self.size))[:self.size])  # type: ignore[attr-defined]
        binary = (b"hdrcharset", b"BINARY") in records
        pax_headers: dict[str, str] = {}
        for raw_keyword, raw_value in records:
            keyword = self._decode_pax_field(raw_keyword, "utf-8", "utf-8", tarfile_.errors)  # type: ignore[attr-defined]
            if keyword.startswith("GNU.sparse."):
                raise UnsafeContent(f"pax key {keyword[:100]!r}: GNU sparse members are refused")
            if keyword in _PAX_NUMBER_FIELDS and len(raw_value) > _MAX_PAX_NUMBER:
                raise UnsafeContent(f"pax key {keyword!r} has a {len(raw_value)}-character value")
            encoding = tarfile_.encoding if binary and keyword in tarfile.PAX_NAME_FIELDS else "utf-8"
            pax_headers[keyword] = self._decode_pax_field(  # type: ignore[attr-defined]
                raw_value, encoding, tarfile_.encoding or "utf-8", tarfile_.errors)
        try:
            following = self.fromtarfile(tarfile_)
        except tarfile.HeaderError as exc:
            raise UnsafeContent(f"the header after a pax header is invalid ({exc})") from None
        following._apply_pax_info(pax_headers, tarfile_.encoding, tarfile_.errors)  # type: ignore[attr-defined]
        following.offset = self.offset
        _check_size(following)
        if "size" in pax_headers:  # the next header starts after the size the pax header gives
            offset = following.offset_data
            if following.isreg() or following.type not in tarfile.SUPPORTED_TYPES:
                offset += following._block(following.size)  # type: ignore[attr-defined]
            tarfile_.offset = offset
        return following


def _check_size(member: tarfile.TarInfo) -> None:
    """Refuse a size tarfile would move its offset by backwards (looping over one header) or absurdly far."""
    if not 0 <= member.size <= MAX_MEMBER_BYTES:
        raise UnsafeContent(f"tar member {member.name[:200]!r} has a size of {member.size} bytes")


class LimitedReader:
    """A read-only stream that charges what comes out of it to the model's budget (decompression bombs)."""

    def __init__(self, inner: IO[bytes] | Any, budget: Budget, what: str) -> None:
        self.inner = inner
        self.budget = budget
        self.what = what

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.inner.read(size if size is not None and size >= 0 else 1 << 20)
        self.budget.expand(len(data), self.what)
        return data


def open_decompressed(raw: IO[bytes], compression: Compression) -> Any:
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
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()) or member.issparse():
        raise UnsafeContent(f"{what}: {member.name!r} has unsupported tar type {member.type!r}")
    if member.size < 0:
        raise UnsafeContent(f"{what}: {member.name!r} has a negative size")


def _check_text(text: str, what: str) -> None:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise UnsafeContent(f"{what}: {text[:120]!r} is not valid UTF-8") from None


def _checked_name(name: str, what: str) -> str:
    """A member's path, normalised: never absolute, never climbing, UTF-8."""
    if name.startswith("/") or ".." in name.split("/"):
        raise UnsafeContent(f"{what}: member {name[:200]!r} escapes the tree")
    _check_text(name, what)
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _checked_path(mapped: str, what: str) -> str:
    mapped = safe_relpath(mapped, what)
    check_depth(mapped, what)
    base = mapped.rpartition("/")[2]
    if base.startswith(WHITEOUT) and base != OPAQUE and base[len(WHITEOUT):] in ("", ".", ".."):
        raise UnsafeContent(f"{what}: whiteout {mapped!r} names no file (it would remove a directory above it)")
    return mapped


def _hardlink_target(member: tarfile.TarInfo, prefix: str, what: str) -> str:
    linkname = member.linkname
    if linkname.startswith("/") or ".." in linkname.split("/"):
        raise UnsafeContent(f"{what}: hard link {member.name!r} points outside the tree ({linkname[:200]!r})")
    target, _ = _strip_prefix(_checked_name(linkname, what), prefix)
    if not target:
        raise UnsafeContent(f"{what}: hard link {member.name!r} points outside the tree ({linkname[:200]!r})")
    return _checked_path(target, what)


@dataclass(frozen=True)
class Member:
    """A tar member that passed every check, renamed into the exposed sub-tree. ``opaque_root``: a whiteout
    of the sub-tree or an ancestor (what lower layers hold is gone). ``removes``: what is at the name goes now
    (a link was declared there; it comes again, with the other links, at the end)."""

    info: tarfile.TarInfo
    opaque_root: bool = False
    removes: bool = False


@dataclass
class _Slot:
    kind: str  # "dir", "file", "symlink" or "hardlink"
    seq: int = 0
    link: tarfile.TarInfo | None = None  # a link's renamed member, yielded at the end
    children: dict[str, _Slot] = field(default_factory=dict)


class _LayerIndex:
    """What each path of one layer is so far: no path goes through a file or a link, a member replaces what
    was at its name (a directory with all beneath it), links wait for the end of the layer."""

    def __init__(self, budget: Budget, what: str) -> None:
        self.root = _Slot("dir")
        self.budget = budget
        self.what = what
        self.seq = 0

    def lookup(self, relpath: str) -> _Slot | None:
        node: _Slot | None = self.root
        for part in relpath.split("/"):
            if node is None or node.kind != "dir":
                return None
            node = node.children.get(part)
        return node

    def kind_of(self, relpath: str) -> str | None:
        slot = self.lookup(relpath)
        return None if slot is None else slot.kind

    def place(self, relpath: str, kind: str, link: tarfile.TarInfo | None = None) -> bool:
        """Record ``kind`` at ``relpath`` (missing directories above it too, charged to the budget); True when
        it replaces a file or directory that extraction has already created."""
        parts = relpath.split("/")
        node = self.root
        for depth, part in enumerate(parts[:-1]):
            child = node.children.get(part)
            if child is None:
                self.budget.charge(self.what, entries=1)
                child = node.children[part] = _Slot("dir")
            elif child.kind != "dir":
                raise UnsafeContent(f"{self.what}: {relpath[:200]!r} goes through "
                                    f"{'/'.join(parts[:depth + 1])[:200]!r}, a {child.kind}, not a directory")
            node = child
        existing = node.children.get(parts[-1])
        if kind == "dir" and existing is not None and existing.kind == "dir":
            return False
        self.seq += 1
        node.children[parts[-1]] = _Slot(kind, self.seq, link)
        return existing is not None and existing.kind in ("dir", "file")

    def links(self) -> Iterator[Member]:
        """The links still in the layer, in the order they came, each checked against the whole layer."""
        found = [(child.seq, path, child) for path, child in walk_tree(self.root) if child.link is not None]
        for _, path, slot in sorted(found, key=lambda item: item[0]):
            assert slot.link is not None
            if slot.kind == "symlink":
                check_symlink(path, slot.link.linkname, self.kind_of, self.what)
            else:
                source = self.lookup(slot.link.linkname)
                if source is None or source.kind not in ("file", "hardlink") or \
                        (source.kind == "hardlink" and source.seq >= slot.seq):
                    raise UnsafeContent(f"{self.what}: hard link {path!r} points to {slot.link.linkname!r}, which "
                                        f"is not a file of this layer")
            yield Member(slot.link)


def open_tar(stream: IO[bytes] | Any, *, streaming: bool) -> tarfile.TarFile:
    """A tarfile reader with bounded pax/GNU headers: ``streaming`` for a pipe (extraction), else over a
    seekable file whose data is never read (the lazy index reads only headers)."""
    return tarfile.open(fileobj=stream, mode="r|" if streaming else "r:",  # type: ignore[call-overload, no-any-return]
                        tarinfo=_BoundedTarInfo, copybufsize=1 << 20)


def checked_members(archive: tarfile.TarFile, *, prefix: str, budget: Budget, what: str) -> Iterator[Member]:
    """The members of ``archive`` under ``prefix``, renamed relative to it and checked: no escaping or
    non-UTF-8 names, no devices, FIFOs, setuid bits, sparse or unknown types, no path through a file or a
    link, at most MAX_DEPTH deep, whiteouts that name a file, and every entry and byte charged to the model's
    ``budget``. Directories and files come in archive order; symlinks and hard links come last, those still
    there at the end of the layer, checked against all of it (symlinks stay inside the tree and never climb
    out of a link; hard links point to a file of the layer). One set of rules for extraction and for the lazy
    index."""
    index = _LayerIndex(budget, what)
    for member in archive:
        del archive.members[:]  # type: ignore[attr-defined]  # tarfile keeps every header; none is needed again
        name = _checked_name(member.name, what)
        mapped, clears_all = _strip_prefix(name, prefix)
        if clears_all:
            budget.charge(what, entries=1)
            index.place(OPAQUE, "file")
            yield Member(tarfile.TarInfo(OPAQUE), opaque_root=True)
            continue
        if not mapped:
            continue
        _refuse_special(member, what)
        mapped = _checked_path(mapped, what)
        budget.charge(what, entries=1, nbytes=member.size if member.isreg() else 0)
        if member.isdir() or member.isreg():
            index.place(mapped, "dir" if member.isdir() else "file")
            yield Member(member.replace(name=mapped, deep=False))
            continue
        if member.issym():
            _check_text(member.linkname, what)
            check_symlink(mapped, member.linkname, lambda _: None, what)  # lexically now, against the layer last
            link, kind = member.replace(name=mapped, deep=False), "symlink"
        else:
            link = member.replace(name=mapped, linkname=_hardlink_target(member, prefix, what), deep=False)
            if index.kind_of(link.linkname) not in ("file", "hardlink"):
                raise UnsafeContent(f"{what}: hard link {mapped!r} points to {link.linkname!r}, which is not a "
                                    f"file of this layer")
            kind = "hardlink"
        if index.place(mapped, kind, link):
            yield Member(link, removes=True)
    yield from index.links()


@contextmanager
def tar_errors(what: str, compression: Compression) -> Iterator[None]:
    """Map what reading (and extracting) a hostile tar can raise to this package's errors."""
    try:
        with fdtree.refusing(what):
            yield
    except UnsafeContent as exc:
        if str(exc).startswith(what):
            raise
        raise UnsafeContent(f"{what}: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, ValueError,
            OverflowError, LookupError) as exc:
        raise IntegrityError(f"{what}: not a valid {compression.value} archive ({exc})") from None
