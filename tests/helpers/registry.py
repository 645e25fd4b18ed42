"""Starting Debian's docker-registry (CNCF distribution) on a free loopback port for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REGISTRY_BINARY = shutil.which("docker-registry") or shutil.which("registry")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningRegistry:
    host: str
    process: subprocess.Popen[bytes]
    root: Path
    log: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_registry(workdir: Path, *, htpasswd: Path | None = None, port: int | None = None) -> RunningRegistry:
    if REGISTRY_BINARY is None:
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    auth = ""
    if htpasswd is not None:
        auth = f"auth:\n  htpasswd:\n    realm: basic-realm\n    path: {htpasswd}\n"
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n"
        f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}")
    log = workdir / "registry.log"
    process = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log.open("wb"),
                               stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
            if response.status_code in (200, 401):
                return RunningRegistry(f"127.0.0.1:{port}", process, workdir, log)
        except requests.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"registry did not start: {log.read_text()[-2000:]}")
