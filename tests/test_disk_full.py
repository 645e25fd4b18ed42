"""A full cache filesystem (a real tmpfs as the cache root) under the processes that write to it: a lazy volume
whose chunk writes fail with ENOSPC answers EIO at once, keeps serving, and reads again once there is room;
the agent, pulling ModelCache objects into a full cache, evicts a least-recently-used model to make room, and
fails a model the cache could never hold with a status that says so, evicting nothing and carrying on."""

from __future__ import annotations

import errno
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from csi_driver.proto import csi_pb2
from modelcache.cache import ModelCache
from modelcache.mounts import mounts_at
from modelcache.store.content import ContentStore
from tests.conftest import make_client, needs_root
from tests.helpers.csi import CsiProcess, publish_request
from tests.helpers.fakekube import Cluster, modelcache, write_kubeconfig
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyProcess
from tests.helpers.registry import RunningRegistry
from tests.helpers.smallfs import small_filesystems
from tests.helpers.waiting import timed_read, wait_for
from tests.test_eviction import declaring

pytestmark = needs_root
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
HANG_GUARD = 120.0



@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``make(size)``: a fresh tmpfs of ``size`` (``mount -o size=``) to use as a cache root."""
    names = itertools.count()
    filesystems = small_filesystems(tmp_path)
    make = next(filesystems)
    yield lambda size: make(f"fs{next(names)}", size)
    next(filesystems, None)  # unmounts


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem of ``directory`` with one file, leaving about ``leave`` bytes free."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096):
            block = b"\0" * size
            try:
                while os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize > leave + size:
                    os.write(fd, block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler



@needs_fuse
def test_a_lazy_read_on_a_full_cache_gives_eio_and_reads_again_once_there_is_room(
        tmp_path: Path, fixtures: Fixtures, registry: RunningRegistry, tmpfs: Callable[[str], Path]) -> None:
    size = 24 << 20
    data = os.urandom(size)
    fixtures.raw_model("full/lazy:v1", {"weights.safetensors": data})
    root = tmpfs("48m")
    proxy = ProxyProcess(registry.host, gate=True)  # the background download gets no byte until the gate opens
    csi = CsiProcess(tmp_path / "driver", root=root)
    target = tmp_path / "pod" / "mnt"
    try:
        csi.node.NodePublishVolume(publish_request("full", target, f"{proxy.host}/full/lazy:v1", mount="lazy"),
                                   timeout=60)
        filler = fill(root)
        middle = size // 2
        failed = timed_read(target / "weights.safetensors", middle, 1 << 20)[0]  # its chunk cannot be written
        assert isinstance(failed, OSError) and failed.errno == errno.EIO, failed
        log = next((root / "csi" / "lazy").glob("*.log")).read_text()
        assert "No space left on device" in log, log[-3000:]
        assert mounts_at(target)[-1].fstype == "fuse.ocimodel"  # the view still serves
        filler.unlink()
        again = timed_read(target / "weights.safetensors", middle, 1 << 20)[0]
        assert again == data[middle:middle + (1 << 20)]
        proxy.open_gate()
        wait_for(lambda: mounts_at(target)[-1].fstype != "fuse.ocimodel", "the finished tree")
        assert (target / "weights.safetensors").read_bytes() == data
    finally:
        if csi.process and csi.process.poll() is None:
            csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="full", target_path=str(target)),
                                         timeout=60)
            csi.stop()
        proxy.close()


def test_the_agent_on_a_full_cache_evicts_to_make_room_and_fails_what_could_never_fit(
        tmp_path: Path, fixtures: Fixtures, tmpfs: Callable[[str], Path]) -> None:
    old, new = os.urandom(12 << 20), os.urandom(12 << 20)
    fixtures.raw_model("full/old:v1", {"w.bin": old})
    fixtures.raw_model("full/new:v1", {"w.bin": new})
    huge = declaring(fixtures, "full/huge:v1", 100 << 20)  # declares more than the whole filesystem
    root = tmpfs("32m")
    cache = ModelCache(ContentStore(root), make_client())
    cached = cache.pull(fixtures.ref("full/old:v1"))  # used once, by no one now
    fill(root, leave=4 << 20)  # "new" starts, then the disk is full: only evicting "old" makes room
    cluster = Cluster([modelcache("new", fixtures.ref("full/new:v1")), modelcache("huge", huge)], {})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.api.url)
    config = tmp_path / "node.yaml"
    config.write_text("highWatermark: 1.0\nlowWatermark: 0.9\n")  # no watermark pass: the pull itself must make room
    log = tmp_path / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "agent", "--node-name", "node-a", "--kubeconfig",
                              str(kubeconfig), "--root", str(root), "--config", str(config), "--plain-http",
                              "--metrics-address", "127.0.0.1:0"], stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def final(name: str) -> list[dict[str, Any]]:
        return [s for s in cluster.status_patches(name) if s.get("phase") in ("Ready", "Failed")]

    try:
        ready = wait_for(lambda: final("new"), "the pull of new")[0]
        assert ready["phase"] == "Ready", ready
        assert ready["bytes"] == len(new)
        assert cache.get_record(cached.record.key) is None and not cached.path.exists()  # evicted to make room
        assert "cache full: evicted 1 models" in log.read_text()
        refused = wait_for(lambda: final("huge"), "the pull of huge")[0]
        assert refused["phase"] == "Failed", refused
        assert "more than the cache could ever hold" in refused["message"], refused
        warning = wait_for(lambda: cluster.event_bodies("huge", "PullFailed"), "the PullFailed event")
        assert warning[0]["type"] == "Warning"
        records = [r.reference for r in cache.records()]
        assert len(records) == 1 and "/full/new:v1@" in records[0]  # huge evicted nothing
        assert not list((root / "ingest").iterdir())  # no partial download left to keep the disk full
        assert agent.poll() is None
    finally:
        agent.terminate()
        agent.wait(20)
        cluster.api.close()
