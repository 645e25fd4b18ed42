"""Assembly of a model tree from committed blobs (hardlinks) and extracted tar layers (overlay merge), all of
it relative to directory descriptors (:mod:`modelcache.assemble.fdtree`): no path operation can follow a link a layer
planted, and the finished tree's links are checked by the same rule as a layer's
(:func:`modelcache.assemble.treerules.check_symlink`), without resolving them."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from modelcache.assemble import fdtree
from modelcache.assemble.paths import PathFilter
from modelcache.assemble.safetar import OPAQUE, WHITEOUT
from modelcache.assemble.treerules import check_symlink
from modelcache.errors import UnsafeContent


@dataclass
class TreeStats:
    """Files placed and their total bytes (each inode counted once)."""

    files: int = 0
    bytes: int = 0


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


class TreeBuilder:
    """Builds one tree in a staging directory, applying layers in order. Close it (or use it as a context
    manager) to release the staging directory's descriptor."""

    def __init__(self, staging: Path, path_filter: PathFilter) -> None:
        self.root = staging
        self.filter = path_filter
        self.root.mkdir(parents=True, exist_ok=True)
        self.fd = fdtree.open_path(staging)

    def __enter__(self) -> TreeBuilder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the staging directory."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def add_file(self, relpath: str, blob: Path) -> None:
        """Place the blob at ``relpath`` (a raw layer)."""
        if not self.filter.accepts(relpath):
            return
        parent, _, name = relpath.rpartition("/")
        with fdtree.refusing(f"file {relpath!r}"), fdtree.opened(self.fd, parent, create=True) as directory:
            blob_dir = fdtree.open_path(blob.parent)
            try:
                fdtree.link_or_copy(blob_dir, blob.name, directory, name)
            finally:
                os.close(blob_dir)

    def overlay(self, layer_dir: Path, dest: str = "") -> None:
        """Merge an extracted tar layer at ``dest``, honouring OCI whiteouts and opaque markers."""
        with fdtree.refusing(f"layer {layer_dir.name}"):
            source = fdtree.open_path(layer_dir)
            try:
                with fdtree.opened(self.fd, dest, create=True) as target:
                    self._merge(source, target, dest)
            finally:
                os.close(source)

    def _merge(self, source_root: int, target_root: int, relbase: str) -> None:
        pending = [""]
        while pending:
            relpath = pending.pop()
            with fdtree.opened(source_root, relpath) as source, fdtree.opened(target_root, relpath) as target:
                entries = fdtree.listing(source)
                names = {name for name, _ in entries}
                if OPAQUE in names:
                    for child in os.listdir(target):
                        fdtree.remove(target, child)
                for name in names:
                    if name.startswith(WHITEOUT) and name != OPAQUE:
                        fdtree.remove(target, name[len(WHITEOUT):])
                for name, st in entries:
                    if name.startswith(WHITEOUT):
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        if fdtree.kind(target, name) != "dir":
                            fdtree.remove(target, name)
                            os.mkdir(name, 0o755, dir_fd=target)
                        pending.append(_join(relpath, name))
                    elif not self.filter.accepts(_join(relbase, relpath, name)):
                        continue
                    elif stat.S_ISLNK(st.st_mode):
                        fdtree.remove(target, name)
                        os.symlink(os.readlink(name, dir_fd=source), name, dir_fd=target)
                    elif stat.S_ISREG(st.st_mode):
                        fdtree.link_or_copy(source, name, target, name)

    def finish(self) -> TreeStats:
        """Check every symlink stays inside (lexically, from its own directory, never climbing out of another
        link), make directories read-only, and count the files."""
        stats = TreeStats()
        seen: set[int] = set()
        with fdtree.refusing("model tree"):
            for relpath, fd, entries in fdtree.walk(self.fd):
                for name, st in entries:
                    if stat.S_ISLNK(st.st_mode):
                        check_symlink(_join(relpath, name), os.readlink(name, dir_fd=fd), self.kind_at, "model")
                    elif stat.S_ISREG(st.st_mode):
                        stats.files += 1
                        if st.st_ino not in seen:
                            seen.add(st.st_ino)
                            stats.bytes += st.st_size
                    elif not stat.S_ISDIR(st.st_mode):
                        raise UnsafeContent(f"model: {_join(relpath, name)!r} is neither file, directory nor link")
                os.fchmod(fd, 0o555)
        return stats

    def kind_at(self, relpath: str) -> str | None:
        """What is at ``relpath`` in the tree (not following links)."""
        return fdtree.kind_at(self.fd, relpath)

    def is_dir(self, relpath: str) -> bool:
        """True when ``relpath`` is a directory of the tree, reached through directories only."""
        return self.kind_at(relpath) == "dir"
