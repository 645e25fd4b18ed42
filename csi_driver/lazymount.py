"""Starting and finding the detached helper processes that serve lazy (FUSE) mounts."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import selectors
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from modelcache.credentials import CredentialStore
from modelcache.errors import Kind, ModelCacheError
from modelcache.mounts import mount_table, unmount
from modelcache.pull import PullOptions
from modelcache.settings import Settings

log = logging.getLogger(__name__)
READY_TIMEOUT = 90.0
FUSE_TYPE = "fuse.ocimodel"


@dataclass(frozen=True)
class Started:
    """A helper that has mounted and is serving."""

    pid: int
    files: int
    total_bytes: int


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


def alive(pid: int) -> bool:
    """True when process ``pid`` exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


class LazyLauncher:
    """Runs ``ocimodel fuse-serve`` helpers in their own sessions, so they outlive this process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log_dir = settings.root / "csi" / "lazy"
        self.children: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, target: str, reference: str, options: PullOptions, credentials: CredentialStore | None,
              strict: bool, timeout: float = READY_TIMEOUT) -> Started:
        """Start a helper for ``target`` and wait until it has mounted."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{hashlib.sha256(target.encode()).hexdigest()[:16]}.log"
        job = {"target": target, "reference": reference, "settings": self.settings.to_mapping(),
               "docker_config": credentials.to_docker_config() if credentials else {"auths": {}},
               "include": list(options.include), "exclude": list(options.exclude), "path": options.subpath,
               "strict": strict}
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "fuse-serve"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=log_file, start_new_session=True)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(job).encode())
        process.stdin.close()
        line = self._first_line(process, timeout)
        if line.startswith("READY"):
            _, files, total = line.split()
            self.children[process.pid] = process
            return Started(process.pid, int(files), int(total))
        process.kill()
        process.wait()
        if line.startswith("ERROR"):
            _, kind, message = line.split(" ", 2)
            raise ModelCacheError(message, kind=Kind[kind] if kind in Kind.__members__ else Kind.INTERNAL)
        tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
        raise ModelCacheError(f"the lazy mount helper did not start: {line or 'no answer'}; log: {tail}",
                              kind=Kind.INTERNAL)

    @staticmethod
    def _first_line(process: subprocess.Popen[bytes], timeout: float) -> str:
        assert process.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buffer = b""
        while b"\n" not in buffer and time.monotonic() < deadline:
            if not selector.select(max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                break
            buffer += chunk
        selector.close()
        process.stdout.close()
        return buffer.decode(errors="replace").strip().splitlines()[0] if buffer.strip() else ""

    def wait_gone(self, pid: int, timeout: float = 10.0) -> None:
        """After unmounting, wait for the helper to exit (reaping it when it is our child)."""
        child = self.children.pop(pid, None)
        if child is not None:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            return
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def stale_fuse_mounts(known: set[str]) -> list[str]:
    """Our FUSE mounts whose daemon is gone (ENOTCONN), except those in ``known``."""
    return [m.mountpoint for m in mount_table()
            if m.fstype == FUSE_TYPE and m.mountpoint not in known and not healthy(m.mountpoint)]


def detach(target: str) -> None:
    """Lazily unmount everything stacked at ``target``."""
    for _ in range(8):
        if not unmount(target, lazy=True):
            break
    with contextlib.suppress(OSError):
        Path(target).rmdir()
