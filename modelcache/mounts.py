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


def mounts_of(source_dir: Path | str) -> list[MountInfo]:
    """Bind mounts whose source is ``source_dir`` (matched by device and path inside the filesystem)."""
    source = os.path.realpath(source_dir)
    try:
        st = os.stat(source)
    except FileNotFoundError:
        return []
    device = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    result = []
    for mount in mount_table():
        if mount.device != device or mount.mountpoint == source:
            continue
        if mount.root != "/" and (source == mount.root or source.endswith(mount.root)):
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


def unmount(target: Path | str, *, lazy: bool = False) -> bool:
    """Unmount ``target``; False when nothing was mounted there."""
    rc = _libc.umount2(os.fsencode(str(target)), MNT_DETACH if lazy else 0)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise OSError(err, f"unmount {target}: {os.strerror(err)}")
    return True
