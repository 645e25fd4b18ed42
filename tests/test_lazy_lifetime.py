"""A lazy volume lives as long as its pod, not as long as the plugin (issue 18): seen from a pod's own mount
namespace, a reader holding a file of the volume open, and an mmap of it, keeps reading while the plugin is
SIGKILLed and a new one starts (the download finished, or still running); the new plugin adopts the volume,
and its NodeUnpublishVolume leaves nothing behind; servers of volumes unpublished while no plugin ran are
ended at start."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from csi_driver.proto import csi_pb2
from modelcache.mounts import mounts_at
from tests.helpers.csi import CsiProcess, helper_pid
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyProcess
from tests.test_as_deployed import POD_UID, inline_request, kubelet_target, node, plugin, sha, stop_all, wait_until

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")]
__all__ = ["node"]  # the fixture
SIZE = 24 << 20
FUSE = "fuse.ocimodel"
READER = r"""
import hashlib, mmap, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
view = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
print("READY", flush=True)
for line in sys.stdin:
    how, offset, size = line.split()
    offset, size = int(offset), int(size)
    try:
        if how == "read":
            data = os.pread(fd, size, offset)
        elif how == "map":
            data = view[offset:offset + size]
        else:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        print(hashlib.sha256(data).hexdigest(), flush=True)
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
"""


class Reader:
    """A container process in a mount namespace of its own (kubelet's default: private propagation) that
    holds ``path`` open and mmapped and reads it on request."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                                         "-c", READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.ask_line(None) == "READY"

    def ask_line(self, line: str | None) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        if line is not None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer, f"the reader died (exit {self.process.poll()}; -7 is SIGBUS)"
        return answer

    def check(self, data: bytes, offset: int, size: int = 1 << 20) -> None:
        """The held descriptor, the mmap and a new open each read ``data[offset:offset+size]``."""
        want = sha(data[offset:offset + size])
        for how in ("read", "map", "open"):
            assert self.ask_line(f"{how} {offset} {size}") == want, f"{how} at {offset}"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


def _kill_plugin(csi: CsiProcess) -> None:
    assert csi.process is not None
    csi.channel.close()
    csi.process.send_signal(signal.SIGKILL)
    csi.process.wait(20)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except FileNotFoundError:
        return False


def _nothing_left(csi: CsiProcess, target: Path, server: int) -> None:
    wait_until(lambda: not _alive(server), 20, f"server {server} to end")
    assert not target.exists() and not mounts_at(target)
    lazy = csi.root / "csi" / "lazy"
    assert not list(lazy.glob("*.server.json")) and not list(lazy.glob("*.sock")), list(lazy.iterdir())
    assert not list((csi.root / "csi" / "publications").glob("*.json"))


def _unpublish(csi: CsiProcess, volume: str, target: Path) -> None:
    request = inline_request(volume, target, "x/y:z")
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=request.volume_id,
                                                                    target_path=str(target)))


def _metric(csi: CsiProcess, outcome: str) -> str:
    port = re.findall(r"metrics on port (\d+)", csi.log_text())[-1]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found = re.findall(rf'ocimodel_csi_lazy_restores_total{{outcome="{outcome}"}} (\S+)', text)
    return found[0] if found else "0"


@pytest.mark.parametrize("download", ["finished", "running"])
def test_readers_keep_reading_through_a_plugin_sigkill_and_the_new_plugin_adopts(
        node: Path, fixtures: Fixtures, registry, download: str) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(SIZE)
    fixtures.raw_model("lifetime/model:v1", {"weights.safetensors": data, "config.json": b"{}"})
    proxy = ProxyProcess(registry.host, bytes_per_second=12_000_000 if download == "finished" else 1_000_000,
                         log=str(node / "proxy.log"))
    csi = plugin(node, "--metrics-address", "127.0.0.1:0")
    reader = None
    try:
        target = kubelet_target(node / "pods", POD_UID, "model")
        csi.node.NodePublishVolume(inline_request("model", target, f"{proxy.host}/lifetime/model:v1", mount="lazy"))
        reader = Reader(target / "weights.safetensors")  # the container starts on the FUSE view
        reader.check(data, SIZE - (1 << 20))
        server = helper_pid(csi, target)
        blob = csi.root / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
        if download == "finished":
            wait_until(lambda: mounts_at(target)[-1].fstype != FUSE, 60, "the finished tree")
        else:
            assert not blob.exists()

        _kill_plugin(csi)  # a crash, a deleted plugin pod, a rollout: no goodbye
        reader.check(data, 4 << 20)  # while no plugin runs
        csi.start()

        assert "adopted lazy volume" in csi.log_text() and "ModelVolumeRestored" not in csi.log_text()
        assert _alive(server) and helper_pid(csi, target) == server  # the same server: never a second one
        assert _metric(csi, "adopted") == "1.0"
        for offset in (0, 8 << 20, SIZE - 4096):
            reader.check(data, offset, 4096)
        if download == "running":
            assert not blob.exists(), "the download ended before the restart: throttle harder"
            wait_until(blob.exists, 120, "the download to finish")
            wait_until(lambda: mounts_at(target)[-1].fstype != FUSE, 30, "the finished tree")
        reader.check(data, 0, SIZE)  # every byte, through the held descriptor, the mmap and a new open
        csi.node.NodePublishVolume(inline_request("model", target, f"{proxy.host}/lifetime/model:v1", mount="lazy"))
        reader.close()
        reader = None
        _unpublish(csi, "model", target)  # through the new plugin
        _nothing_left(csi, target, server)
    finally:
        if reader is not None:
            reader.close()
        stop_all(csi)
        proxy.close()


def test_servers_of_volumes_unpublished_while_no_plugin_ran_are_ended_at_start(
        node: Path, fixtures: Fixtures, registry) -> None:  # type: ignore[no-untyped-def]
    fixtures.raw_model("lifetime/orphan:v1", {"weights.safetensors": os.urandom(SIZE)})
    proxy = ProxyProcess(registry.host, bytes_per_second=1_000_000, log=str(node / "proxy.log"))
    csi = plugin(node)
    try:
        by_hand = kubelet_target(node / "pods", POD_UID, "by-hand")
        no_record = kubelet_target(node / "pods", POD_UID, "no-record")
        for volume, target in (("by-hand", by_hand), ("no-record", no_record)):
            csi.node.NodePublishVolume(inline_request(volume, target, f"{proxy.host}/lifetime/orphan:v1",
                                                      mount="lazy"))
        servers = {target: helper_pid(csi, target) for target in (by_hand, no_record)}
        _kill_plugin(csi)
        subprocess.run(["umount", "--lazy", str(by_hand)], check=True)  # unpublished while no plugin ran
        record = next(p for p in (csi.root / "csi" / "publications").glob("*.json")
                      if f'"target_path": "{no_record}"' in p.read_text())
        record.unlink()  # a server whose volume this plugin knows nothing of
        assert _alive(servers[no_record])
        csi.start()
        assert "was unmounted while no plugin ran" in csi.log_text()
        assert "which has no record" in csi.log_text()
        for target, server in servers.items():
            _nothing_left(csi, target, server)
        for volume, target in (("by-hand", by_hand), ("no-record", no_record)):
            _unpublish(csi, volume, target)  # kubelet's late unpublish: an unknown target is fine
    finally:
        stop_all(csi)
        proxy.close()
