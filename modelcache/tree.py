"""Assembly of a model tree from committed blobs (hardlinks) and extracted tar layers (overlay merge)."""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from modelcache.errors import UnsafeContent
from modelcache.paths import PathFilter
from modelcache.safetar import OPAQUE, WHITEOUT


@dataclass
class TreeStats:
    """Files placed and their total bytes (each inode counted once)."""

    files: int = 0
    bytes: int = 0


def _clear(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def link_file(source: Path, target: Path) -> None:
    """Hardlink ``source`` at ``target`` (copy when the link count is exhausted)."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EMLINK, errno.EXDEV):
            raise
        shutil.copyfile(source, target)
        os.chmod(target, 0o444)


def _ensure_parent(root: Path, relpath: str) -> Path:
    """Create the directories above ``relpath`` under ``root``, refusing to go through symlinks."""
    current = root
    parts = relpath.split("/")
    for part in parts[:-1]:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            raise UnsafeContent(f"path {relpath!r} passes through a non-directory {part!r}")
        current.mkdir(exist_ok=True)
    return root / relpath


class TreeBuilder:
    """Builds one tree in a staging directory, applying layers in order."""

    def __init__(self, staging: Path, path_filter: PathFilter) -> None:
        self.root = staging
        self.filter = path_filter
        self.root.mkdir(parents=True, exist_ok=True)

    def add_file(self, relpath: str, blob: Path) -> None:
        """Place the blob at ``relpath`` (a raw layer)."""
        if not self.filter.accepts(relpath):
            return
        target = _ensure_parent(self.root, relpath)
        _clear(target)
        link_file(blob, target)

    def overlay(self, layer_dir: Path, dest: str = "") -> None:
        """Merge an extracted tar layer at ``dest``, honouring OCI whiteouts and opaque markers."""
        base = self.root
        if dest:
            base = _ensure_parent(self.root, dest + "/x").parent
        self._merge(layer_dir, base, dest)

    def _merge(self, source: Path, target: Path, relbase: str) -> None:
        entries = sorted(os.scandir(source), key=lambda e: e.name)
        if any(e.name == OPAQUE for e in entries):
            for child in list(target.iterdir()):
                _clear(child)
        for entry in entries:
            if entry.name.startswith(WHITEOUT) and entry.name != OPAQUE:
                _clear(target / entry.name[len(WHITEOUT):])
        for entry in entries:
            if entry.name.startswith(WHITEOUT):
                continue
            relpath = posixpath.join(relbase, entry.name) if relbase else entry.name
            destination = target / entry.name
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if not destination.is_dir() or destination.is_symlink():
                    _clear(destination)
                    destination.mkdir()
                self._merge(Path(entry.path), destination, relpath)
            elif not self.filter.accepts(relpath):
                continue
            elif stat.S_ISLNK(st.st_mode):
                _clear(destination)
                os.symlink(os.readlink(entry.path), destination)
            elif stat.S_ISREG(st.st_mode):
                _clear(destination)
                link_file(Path(entry.path), destination)

    def finish(self) -> TreeStats:
        """Check symlinks stay inside, make directories read-only, and count what is there."""
        stats = TreeStats()
        seen: set[int] = set()
        real_root = os.path.realpath(self.root)
        for dirpath, dirnames, filenames in os.walk(self.root):
            for name in filenames + dirnames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    resolved = os.path.realpath(path)
                    if resolved != real_root and not resolved.startswith(real_root + os.sep):
                        raise UnsafeContent(f"symlink {os.path.relpath(path, self.root)!r} points outside the model")
            for name in filenames:
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    stats.files += 1
                    if st.st_ino not in seen:
                        seen.add(st.st_ino)
                        stats.bytes += st.st_size
        for dirpath, _, _ in os.walk(self.root):
            os.chmod(dirpath, 0o555)
        return stats
