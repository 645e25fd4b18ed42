"""Mount helpers: read-only bind mounts through mount(2), and lookups in /proc/self/mountinfo."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
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
    parent_id: int
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
            result.append(MountInfo(int(fields[0]), int(fields[1]), fields[2], _unescape(fields[3]),
                                    _unescape(fields[4]), fields[5], fields[sep + 1], _unescape(fields[sep + 2])))
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


# open_tree(2), move_mount(2) and mount_setattr(2) share one number on every Linux architecture.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _O_CLOEXEC, _AT_RECURSIVE, _AT_EMPTY_PATH = 0x1, 0o2000000, 0x8000, 0x1000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_MS_PRIVATE = 1 << 18


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def bind_mount_readonly(source: Path | str, target: Path | str) -> None:
    """Bind ``source`` at ``target`` read-only, nosuid and nodev in every mount namespace that sees it.

    The flags are set before the mount is attached, so the copies that mount propagation hands to peer
    namespaces (the host's, a pod's) carry them too; a bind followed by a read-only remount would change
    only the copy in this namespace. Kernels without mount_setattr(2) (before 5.12) get the same result
    through a read-only bind in a private staging mount, which is then bound at ``target``."""
    try:
        bind_detached_readonly(source, target)
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        bind_via_private_staging(source, target)


def bind_detached_readonly(source: Path | str, target: Path | str) -> None:
    """open_tree(CLONE) ``source``, set read-only/nosuid/nodev on the detached copy, move it to ``target``."""
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    fd = syscall(_SYS_OPEN_TREE, -100, os.fsencode(str(source)), _OPEN_TREE_CLONE | _O_CLOEXEC | _AT_RECURSIVE)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree {source}: {os.strerror(err)}")
    try:
        attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, 0, 0)
        rc = syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH | _AT_RECURSIVE, ctypes.byref(attr),
                     ctypes.sizeof(attr))
        _check(rc, f"mount_setattr on a copy of {source}")
        rc = syscall(_SYS_MOVE_MOUNT, fd, b"", -100, os.fsencode(str(target)), _MOVE_MOUNT_F_EMPTY_PATH)
        _check(rc, f"move_mount of {source} to {target}")
    finally:
        os.close(fd)


def bind_via_private_staging(source: Path | str, target: Path | str) -> None:
    """The pre-5.12 way: make ``source`` read-only in a private staging mount that nothing propagates
    from, then bind that read-only mount at ``target`` (a bind copies the flags of its source mount)."""
    staging = tempfile.mkdtemp(prefix="ocimodel-staging-")
    stage = os.fsencode(staging)
    try:
        _check(_libc.mount(stage, stage, None, MS_BIND, None), f"bind {staging} on itself")
        try:
            _check(_libc.mount(None, stage, None, _MS_PRIVATE, None), f"make {staging} private")
            _check(_libc.mount(os.fsencode(str(source)), stage, None, MS_BIND | MS_REC, None),
                   f"bind mount {source} on {staging}")
            flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
            _check(_libc.mount(None, stage, None, flags, None), f"remount {staging} read-only")
            _check(_libc.mount(stage, os.fsencode(str(target)), None, MS_BIND, None),
                   f"bind mount {source} on {target}")
        finally:
            unmount_all(staging, lazy=True)
    finally:
        os.rmdir(staging)


def mount_options(path: Path | str) -> set[str]:
    """The per-mount options (``ro``, ``nosuid``, ...) of the topmost mount at ``path`` in this namespace."""
    mounts = mounts_at(path)
    if not mounts:
        raise FileNotFoundError(errno.ENOENT, "nothing is mounted", str(path))
    return set(mounts[-1].options.split(","))


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
