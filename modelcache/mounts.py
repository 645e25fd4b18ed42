"""Mount helpers: read-only bind mounts through mount(2), and lookups in /proc/self/mountinfo."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    device: str
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str


def _unescape(text: str) -> str:
    return text.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_table() -> list[MountInfo]:
    """The mounts visible to this process."""
    result = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            sep = fields.index("-")
            result.append(MountInfo(int(fields[0]), fields[2], _unescape(fields[3]), _unescape(fields[4]),
                                    fields[5], fields[sep + 1], _unescape(fields[sep + 2])))
    return result


def mounts_at(path: Path | str) -> list[MountInfo]:
    """Mounts whose mount point is ``path`` (bottom first)."""
    target = os.path.normpath(str(path))
    return [m for m in mount_table() if m.mountpoint == target]


def is_mountpoint(path: Path | str) -> bool:
    """True when something is mounted at ``path``."""
    return bool(mounts_at(path))


def _fs_location(path: Path | str) -> tuple[str, str] | None:
    """``(device, path inside its filesystem)`` of ``path``, from the mount that contains it."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return None
    best: MountInfo | None = None
    for mount in mount_table():
        point = mount.mountpoint.rstrip("/") or "/"
        if (real == point or real.startswith(point.rstrip("/") + "/")) and \
                (best is None or len(point) >= len(best.mountpoint)):
            best = mount
    if best is None:
        return None
    inner = real[len(best.mountpoint.rstrip("/")):] or "/"
    return best.device, os.path.normpath(best.root.rstrip("/") + "/" + inner.lstrip("/"))


def mounts_of(source_dir: Path | str, *, inside: bool = False) -> list[MountInfo]:
    """Other mounts that show ``source_dir`` (or, with ``inside``, anything below it), matched by device
    and path inside the filesystem."""
    location = _fs_location(source_dir)
    if location is None:
        return []
    device, fs_path = location
    own = os.path.realpath(source_dir)
    result = []
    for mount in mount_table():
        if mount.device != device or mount.mountpoint == own or mount.mountpoint.startswith(own + "/"):
            continue
        root = os.path.normpath(mount.root)
        if root == fs_path or (inside and root.startswith(fs_path + "/")):
            result.append(mount)
    return result


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind_mount_readonly(source: Path | str, target: Path | str) -> None:
    """Bind ``source`` at ``target`` and make that mount read-only, nosuid, nodev."""
    src, dst = os.fsencode(str(source)), os.fsencode(str(target))
    _check(_libc.mount(src, dst, None, MS_BIND | MS_REC, None), f"bind mount {source} on {target}")
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    rc = _libc.mount(None, dst, None, flags, None)
    if rc != 0:
        err = ctypes.get_errno()
        _libc.umount2(dst, MNT_DETACH)
        raise OSError(err, f"remount {target} read-only: {os.strerror(err)}")


def unmount_all(target: Path | str, *, lazy: bool = False) -> None:
    """Unmount everything stacked at ``target`` (e.g. a bind mount over a FUSE mount)."""
    while is_mountpoint(target):
        if not unmount(target, lazy=lazy):
            return


def unmount(target: Path | str, *, lazy: bool = False) -> bool:
    """Unmount ``target``; False when nothing was mounted there."""
    rc = _libc.umount2(os.fsencode(str(target)), MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")
    return True
