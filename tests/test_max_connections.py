"""``maxConnections`` is node-wide: two ``ocimodel pull`` processes that each want eight Range connections for a
large blob, through a registry front that limits each connection (so their lead streams split into pieces),
share the node's slots. The proxy counts, whenever a blob request arrives, the blob connections whose client
has not closed them yet."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from modelcache.digest import Digest
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyBehaviour, RegistryProxy

SIZE = 12 << 20
LIMIT = 3
PER_BLOB = 8


def client_still_open(sock: socket.socket) -> bool:
    """False once the client has closed its end (a client sends nothing more after its request)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return not readable or sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except (OSError, ValueError):  # reset by the client, or already closed here (fd -1)
        return False


class CountingProxy(RegistryProxy):
    """A proxy that throttles each connection and records the most blob connections open at once (all of
    them, and how many distinct blobs they were for)."""

    def __init__(self, upstream: str, watched: set[str], behaviour: ProxyBehaviour) -> None:
        super().__init__(upstream, behaviour)
        self.watched = watched
        self.open: list[tuple[socket.socket, str]] = []
        self.peak = 0
        self.peak_blobs_at_once = 0
        self.total = 0
        self.count_lock = threading.Lock()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        digest = h.path.rsplit("/", 1)[-1] if h.command == "GET" and "/blobs/" in h.path else ""
        if digest not in self.watched:
            return super()._handle(h)
        entry = (h.connection, digest)
        with self.count_lock:
            self.open = [(s, d) for s, d in self.open if client_still_open(s)] + [entry]
            self.total += 1
            self.peak = max(self.peak, len(self.open))
            self.peak_blobs_at_once = max(self.peak_blobs_at_once, len({d for _, d in self.open}))
        try:
            return super()._handle(h)
        finally:
            with self.count_lock:
                self.open = [e for e in self.open if e is not entry]


def test_the_connection_limit_holds_across_two_pulling_processes(fixtures: Fixtures, tmp_path: Path) -> None:
    blobs = {name: os.urandom(SIZE) for name in ("a", "b")}
    for name, data in blobs.items():
        fixtures.raw_model(f"maxconn/{name}:v1", {"weights.bin": data})
    watched = {str(Digest.of_bytes(data)) for data in blobs.values()}
    proxy = CountingProxy(fixtures.host, watched, ProxyBehaviour(bytes_per_second=2_000_000))  # per connection
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"maxConnections": LIMIT, "connectionsPerBlob": PER_BLOB, "rangedMinSizeMiB": 1}))
    root = tmp_path / "root"
    try:
        pulls = [subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "pull", f"{proxy.host}/maxconn/{name}:v1",
                                   "--root", str(root), "--config", str(config), "--plain-http", "--json"],
                                  stdout=(tmp_path / f"{name}.out").open("wb"),
                                  stderr=(tmp_path / f"{name}.err").open("wb")) for name in blobs]
        for pull in pulls:
            pull.wait(240)
    finally:
        proxy.close()
    for name, pull in zip(blobs, pulls, strict=True):
        assert pull.returncode == 0, (tmp_path / f"{name}.err").read_text()
        path = Path(json.loads((tmp_path / f"{name}.out").read_text())["path"])
        assert (path / "weights.bin").read_bytes() == blobs[name], name
    assert proxy.total > 2 * 2, "the blobs were not split into ranges: the limit was never tested"
    assert proxy.peak_blobs_at_once == 2, "the two pulls never overlapped"
    assert proxy.peak == LIMIT, f"{proxy.peak} connections at once; the node allows {LIMIT}"
