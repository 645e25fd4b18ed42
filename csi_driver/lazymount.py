"""Starting and finding the detached helper processes that serve lazy (FUSE) mounts."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import selectors
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelcache.credentials import CredentialStore
from modelcache.errors import Kind, ModelCacheError
from modelcache.fsutil import atomic_write_json, read_json
from modelcache.mounts import mount_table, unmount_all
from modelcache.options import PullOptions
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


def helper_alive(pid: int) -> bool:
    """True when ``pid`` is a live lazy-mount helper (a new pod may have reused the number for another process)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return alive(pid) and b"fuse-serve" in command


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


def _helper_file(root: Path | str, target: str, suffix: str) -> Path:
    """A file of the helper serving ``target``, under ``<root>/csi/lazy``."""
    directory = Path(root) / "csi" / "lazy"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{hashlib.sha256(target.encode()).hexdigest()[:16]}{suffix}"


def helper_log(job: dict[str, Any]) -> Path:
    """Where the helper of ``job`` writes its log (under the cache root)."""
    return _helper_file(job["settings"]["root"], job["target"], ".log")


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


def spawn_helper(job: dict[str, Any], timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``ocimodel fuse-serve`` in its own session with ``job`` on stdin; return it and the reply
    line (``READY files bytes`` once mounted, ``ERROR KIND message``, or '' on silence). A helper that did
    not get ready is killed."""
    with open(helper_log(job), "ab") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "fuse-serve"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log_file, start_new_session=True)
    assert process.stdin is not None
    process.stdin.write(json.dumps(job).encode())
    process.stdin.close()
    line = _first_line(process, timeout)
    if not line.startswith("READY"):
        process.kill()
        process.wait()
    return process, line


class LazyLauncher:
    """Starts ``ocimodel fuse-serve`` helpers: through a launcher process in another container when one
    is configured (so the helpers outlive this container), else as detached children of this process."""

    def __init__(self, settings: Settings, launcher_socket: str = "") -> None:
        self.settings = settings
        self.launcher_socket = launcher_socket
        self.children: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, target: str, reference: str, options: PullOptions, credentials: CredentialStore | None,
              strict: bool, timeout: float = READY_TIMEOUT, *, for_volume: bool = True) -> Started:
        """Start a helper for ``target`` and wait until it has mounted. ``for_volume``: the helper is lent
        node-wide credentials only for ``nodeCredentialRegistries`` (``ocimodel mount`` passes False)."""
        job = {"target": target, "reference": reference, "settings": self.settings.to_mapping(),
               "docker_config": credentials.to_docker_config() if credentials else {"auths": {}},
               "for_volume": for_volume,
               "include": list(options.include), "exclude": list(options.exclude), "path": options.subpath,
               "strict": strict, "verdict": str(verdict_path(self.settings.root, target))}
        verdict_path(self.settings.root, target).unlink(missing_ok=True)
        line = self._ask_launcher(job, timeout) if self.launcher_socket else None
        if line is None:
            process, line = spawn_helper(job, timeout)
            if line.startswith("READY"):
                self.children[process.pid] = process
                line = f"{line} {process.pid}"
        if line.startswith("READY"):
            _, files, total, pid = line.split()
            return Started(int(pid), int(files), int(total))
        if line.startswith("ERROR"):
            _, kind, message = line.split(" ", 2)
            raise ModelCacheError(message, kind=Kind[kind] if kind in Kind.__members__ else Kind.INTERNAL)
        log_path = helper_log(job)
        tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
        raise ModelCacheError(f"the lazy mount helper did not start: {line or 'no answer'}; log: {tail}",
                              kind=Kind.INTERNAL)

    def _ask_launcher(self, job: dict[str, Any], timeout: float) -> str | None:
        """Hand ``job`` to the launcher; None when no launcher answers (the caller starts the helper itself)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout + 5)
                conn.connect(self.launcher_socket)
                conn.sendall(json.dumps(job).encode())
                conn.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
        except OSError as exc:
            log.warning("fuse launcher at %s unavailable (%s); starting the helper here", self.launcher_socket, exc)
            return None
        return reply.decode(errors="replace").strip()

    def reap(self, pid: int, timeout: float = 10.0) -> None:
        """After unmounting, reap the helper in the background when it is our child (killed if it has not
        ended within ``timeout``); a launcher reaps its own. Never blocks the caller."""
        child = self.children.pop(pid, None)
        if child is None:
            return

        def wait() -> None:
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

        threading.Thread(target=wait, name=f"reap-{pid}", daemon=True).start()


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


def serve_launcher(path: Path) -> None:
    """``ocimodel fuse-launcher``: start helpers for the CSI driver over a root-only unix socket, and reap
    them. It runs in its own container, so the helpers (and their mounts) outlive driver restarts."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            creds = self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _, uid, _ = struct.unpack("3i", creds)
            if uid != 0:
                self.wfile.write(b"ERROR PERMISSION_DENIED only root may start lazy mounts\n")
                return
            job = json.loads(self.rfile.read())
            process, line = spawn_helper(job, READY_TIMEOUT)
            if line.startswith("READY"):
                threading.Thread(target=process.wait, daemon=True, name=f"reap-{process.pid}").start()
                line = f"{line} {process.pid}"
                log.info("started helper %d for %s", process.pid, job.get("target"))
            self.wfile.write(line.encode() + b"\n")

    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    os.chmod(path, 0o600)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    log.info("fuse launcher listening on %s", path)
    server.serve_forever()
    server.server_close()
