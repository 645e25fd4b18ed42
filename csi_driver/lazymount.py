"""Facts about lazy (FUSE) mounts shared by the plugin and their servers: health, verdicts, clean-up."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import time
from pathlib import Path

from modelcache.fsutil import atomic_write_json, read_json
from modelcache.mounts import mount_table, unmount_all

log = logging.getLogger(__name__)
FUSE_TYPE = "fuse.ocimodel"


def fuse_available() -> bool:
    """True when this node can make FUSE mounts."""
    return os.path.exists("/dev/fuse") and os.geteuid() == 0


def healthy(target: str) -> bool:
    """False when the mount at ``target`` has lost its daemon (ENOTCONN) or cannot be reached."""
    try:
        os.stat(target)
    except OSError as exc:
        return exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO)
    return True


def _helper_file(root: Path | str, target: str, suffix: str) -> Path:
    """A file of the helper serving ``target``, under ``<root>/csi/lazy``."""
    directory = Path(root) / "csi" / "lazy"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{hashlib.sha256(target.encode()).hexdigest()[:16]}{suffix}"


def verdict_path(root: Path | str, target: str) -> Path:
    """Where the helper serving ``target`` reports that its model failed verification."""
    return _helper_file(root, target, ".verdict.json")


def write_verdict(path: Path | str, reason: str) -> None:
    """Report (from the helper) that the model failed verification and every read now fails."""
    atomic_write_json(Path(path), {"broken": reason, "at": time.time()})


def read_verdict(path: Path) -> str | None:
    """The reason a helper reported its model broken, or None."""
    data = read_json(path)
    return str(data["broken"]) if isinstance(data, dict) and data.get("broken") else None


def stale_fuse_mounts(known: set[str]) -> list[str]:
    """Our FUSE mounts whose daemon is gone (ENOTCONN), except those in ``known``."""
    return [m.mountpoint for m in mount_table()
            if m.fstype == FUSE_TYPE and m.mountpoint not in known and not healthy(m.mountpoint)]


def detach(target: str, *, remove: bool = True) -> None:
    """Lazily unmount everything stacked at ``target``; then remove the (empty) directory unless not ``remove``."""
    unmount_all(target, lazy=True)
    if remove:
        with contextlib.suppress(OSError):
            Path(target).rmdir()
