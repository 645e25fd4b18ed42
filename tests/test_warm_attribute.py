"""The volume attribute ``warm: "true"``: a publish through the real plugin asks the real agent (same cache root)
to read the model into page cache. Residency is measured with mincore (``modelcache.pagecache``) after the
model's pages were dropped, and checked against util-linux ``fincore`` when it is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from csi_driver.proto import csi_pb2
from modelcache import pagecache
from modelcache.cache import ModelCache
from modelcache.store.content import ContentStore
from tests.conftest import make_client, needs_root
from tests.helpers.csi import CsiProcess, publish_request
from tests.helpers.oci import Fixtures

pytestmark = needs_root
SIZE = 8 << 20


def fincore_bytes(path: Path) -> int | None:
    """Resident bytes of ``path`` as util-linux fincore reports them (None without fincore)."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return int(out.split()[0])


def test_a_publish_with_warm_reads_the_model_into_page_cache(tmp_path: Path, fixtures: Fixtures) -> None:
    weights = {name: os.urandom(SIZE) for name in ("warm", "cold")}
    for name, data in weights.items():
        # no file in common: models that share a file share its inode, and its pages
        fixtures.raw_model(f"warmattr/{name}:v1", {"weights.bin": data, "config.json": f'{{"{name}": 1}}'.encode()})
    root = tmp_path / "root"
    cache = ModelCache(ContentStore(root), make_client())
    trees = {name: cache.pull(fixtures.ref(f"warmattr/{name}:v1")).path for name in weights}
    for name, tree in trees.items():  # cached and then dropped from page cache, as after a reboot
        assert pagecache.evict([tree]).resident_bytes == 0, name
    csi = CsiProcess(tmp_path / "driver", root=root)
    log = tmp_path / "agent.log"
    agent = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "agent", "--node-name", "node-a", "--kubeconfig",
                              "none", "--root", str(root), "--plain-http", "--metrics-address", "127.0.0.1:0"],
                             stdout=log.open("wb"), stderr=subprocess.STDOUT)
    published: list[tuple[str, Path]] = []
    try:
        for name in ("cold", "warm"):
            target = tmp_path / "pods" / name / "mnt"
            request = publish_request(f"vol-{name}", target, fixtures.ref(f"warmattr/{name}:v1"))
            if name == "warm":
                request.volume_context["warm"] = "true"
            csi.node.NodePublishVolume(request, timeout=60)
            published.append((f"vol-{name}", target))
        total = SIZE + len(b'{"warm": 1}')  # both files
        warmed = rf"warmed {re.escape(str(trees['warm']))}: {total} of {total} bytes resident"
        deadline = time.monotonic() + 120  # a guard against a hang only
        # the pages are resident before the agent logs that they are: wait for both
        while (resident := pagecache.report([trees["warm"]]).resident_bytes) < total or \
                not re.search(warmed, log.read_text()):
            assert agent.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"{resident} of {total} bytes resident; agent log:\n{log.read_text()}"
            time.sleep(0.1)
        assert fincore_bytes(trees["warm"] / "weights.bin") in (None, SIZE)
        # the volume without the attribute was not warmed: nothing asked for it
        assert pagecache.report([trees["cold"]]).resident_bytes == 0
        assert fincore_bytes(trees["cold"] / "weights.bin") in (None, 0)
        assert not list((root / "agent" / "warm-requests").glob("*.json"))  # the request was taken
    finally:
        for volume, target in published:
            csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume, target_path=str(target)),
                                         timeout=30)
        agent.terminate()
        agent.wait(20)
        csi.stop()
