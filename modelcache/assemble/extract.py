"""Extraction of a tar layer that cannot escape by construction, whatever Python's tarfile would do: the
members come checked from :func:`modelcache.assemble.safetar.checked_members` (links last), and every entry is created
relative to the descriptor of its directory, each path component opened with O_NOFOLLOW
(:mod:`modelcache.assemble.fdtree`); ``TarFile.extract`` is never called."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from modelcache.assemble import fdtree
from modelcache.assemble.paths import safe_relpath
from modelcache.assemble.safetar import LimitedReader, Member, checked_members, open_decompressed, open_tar, tar_errors
from modelcache.assemble.treerules import Budget
from modelcache.errors import UnsafeContent
from modelcache.registry.mediatypes import Compression

MAX_MTIME = 1 << 34


def extract_tar(blob: Path, compression: Compression, dest: Path, *, budget: Budget, prefix: str = "",
                what: str = "layer") -> None:
    """Extract the tar ``blob`` into the empty directory ``dest``, only members under ``prefix``, charging
    what it holds to ``budget``. Directories end read-only.

    Whiteouts are kept as empty marker files for the tree assembler; a whiteout of the prefix or
    one of its ancestors becomes an opaque marker at the root of ``dest``.
    """
    prefix = safe_relpath(prefix, what) if prefix.strip("/") else ""
    dest.mkdir(parents=True, exist_ok=True)
    root = fdtree.open_path(dest)
    try:
        with tar_errors(what, compression), open(blob, "rb") as raw:
            stream = LimitedReader(open_decompressed(raw, compression), budget, what)
            with open_tar(stream, streaming=True) as archive:
                writer = _Writer(archive, root, what)
                try:
                    for member in checked_members(archive, prefix=prefix, budget=budget, what=what):
                        writer.place(member)
                finally:
                    writer.close()
            for _, fd, _ in fdtree.walk(root):
                os.fchmod(fd, 0o555)
    finally:
        os.close(root)


class _Writer:
    """Creates checked members beneath the layer's root descriptor, never through a link: each directory is
    opened component by component with O_NOFOLLOW, files with O_EXCL after removing what was there."""

    def __init__(self, archive: tarfile.TarFile, root: int, what: str) -> None:
        self.archive = archive
        self.root = root
        self.what = what
        self.parent: tuple[str, int] | None = None  # the last directory written to, kept open

    def _directory(self, relpath: str) -> int:
        if self.parent is not None and self.parent[0] == relpath:
            return self.parent[1]
        self.close()
        fd = fdtree.open_dir(self.root, relpath, create=True)
        self.parent = (relpath, fd)
        return fd

    def close(self) -> None:
        """Close the directory kept open."""
        if self.parent is not None:
            os.close(self.parent[1])
            self.parent = None

    def place(self, member: Member) -> None:
        """Create ``member`` (or, with ``removes``, remove what is at its name)."""
        info = member.info
        parent, _, name = info.name.rpartition("/")
        directory = self._directory(parent)
        if member.opaque_root:
            os.close(fdtree.new_file(directory, name))
        elif member.removes:
            fdtree.remove(directory, name)
        elif info.isdir():
            if fdtree.kind(directory, name) != "dir":
                fdtree.remove(directory, name)
                os.mkdir(name, 0o755, dir_fd=directory)
        elif info.isreg():
            self._write(directory, name, info)
        elif info.issym():
            fdtree.remove(directory, name)
            os.symlink(info.linkname, name, dir_fd=directory)
        else:
            source_dir, _, source_name = info.linkname.rpartition("/")
            with fdtree.opened(self.root, source_dir) as source:
                if fdtree.kind(source, source_name) != "file":
                    raise UnsafeContent(f"{self.what}: hard link {info.name!r} points to {info.linkname!r}, "
                                        f"which is not a regular file")
                fdtree.link_or_copy(source, source_name, directory, name)

    def _write(self, directory: int, name: str, info: tarfile.TarInfo) -> None:
        fd = fdtree.new_file(directory, name)
        try:
            data = self.archive.extractfile(info)
            assert data is not None
            while chunk := data.read(fdtree.COPY_SIZE):
                fdtree.write_all(fd, chunk)
            os.fchmod(fd, (info.mode & 0o555) | 0o444)
            if 0 <= info.mtime < MAX_MTIME:
                os.utime(fd, (info.mtime, info.mtime))
        finally:
            os.close(fd)
