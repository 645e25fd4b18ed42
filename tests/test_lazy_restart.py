"""Lazy volumes across a restart whose server is gone while the download is unfinished (issue 25): a private
volume resumes with the credentials it was published with (kept root-only, gone at unpublish, never
logged); wrong bytes served before the restart (a model without a chunk index) are still found when the
blob commits, by whichever process commits it."""

from __future__ import annotations

import base64
import errno
import json
import os
import re
import signal
import stat
from pathlib import Path

import pytest
import requests

from csi_driver.proto import csi_pb2
from modelcache.mounts import mounts_at
from tests.conftest import PASSWORD, USER
from tests.helpers.csi import helper_pid
from tests.helpers.oci import Fixtures
from tests.helpers.procs import alive
from tests.helpers.proxy import GatedProxy, ProxyBehaviour
from tests.test_as_deployed import POD_UID, inline_request, kubelet_target, node, plugin, sha, stop_all, wait_until
from tests.test_lazy_lifetime import _kill_plugin, _unpublish

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")]
__all__ = ["node"]  # the fixture
SIZE = 24 << 20
FUSE = "fuse.ocimodel"


def _read(path: Path, offset: int, size: int) -> bytes:
    """A read through the FUSE view (the GIL is released while the kernel waits on the in-process proxy)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(size)


def _private_config(node: Path) -> Path:
    config = node / "node.json"
    config.write_text(json.dumps({"connectionsPerBlob": 1}))  # the download is one gated stream
    return config


def test_a_private_lazy_volume_resumes_with_its_kept_credentials(node: Path, fixtures: Fixtures, registry) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(SIZE)
    fixtures.raw_model("restart/private:v1", {"weights.safetensors": data})
    proxy = GatedProxy(registry.host, ProxyBehaviour(token_user=USER, token_password=PASSWORD))
    csi = plugin(node, "--config", str(_private_config(node)))
    try:
        target = kubelet_target(node / "pods", POD_UID, "private")
        request = inline_request("private", target, f"{proxy.host}/restart/private:v1", mount="lazy")
        request.secrets.update({"username": USER, "password": PASSWORD})
        csi.node.NodePublishVolume(request)
        assert _read(target / "weights.safetensors", SIZE - 4096, 4096) == data[-4096:]
        kept = list((csi.root / "csi" / "credentials").iterdir())
        assert len(kept) == 1 and stat.S_IMODE(kept[0].stat().st_mode) == 0o600
        assert stat.S_IMODE(kept[0].parent.stat().st_mode) == 0o700
        blob = csi.root / "blobs" / "sha256" / sha(data)

        server = helper_pid(csi, target)
        _kill_plugin(csi)
        os.kill(server, signal.SIGKILL)
        wait_until(lambda: not alive(server), 10, "the server to end")
        assert not blob.exists()  # the gate holds the download
        csi.start()
        wait_until(lambda: "ModelVolumeRestored" in csi.log_text() or "ModelVolumeLost" in csi.log_text(), 60,
                   "the restore")
        assert "ModelVolumeLost" not in csi.log_text(), csi.log_text()[-3000:]
        assert "resumes the download" in csi.log_text()
        assert mounts_at(target)[-1].fstype == FUSE and helper_pid(csi, target) != server
        assert _read(target / "weights.safetensors", 8 << 20, 1 << 20) == data[8 << 20:9 << 20]
        proxy.gate.set()
        wait_until(blob.exists, 120, "the resumed download to finish")
        wait_until(lambda: mounts_at(target)[-1].fstype != FUSE, 30, "the finished tree")
        assert (target / "weights.safetensors").read_bytes() == data

        _unpublish(csi, "private", target)
        assert not list((csi.root / "csi" / "credentials").iterdir())
    finally:
        proxy.gate.set()
        stop_all(csi)
        proxy.close()
    secret_forms = [PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode())]
    for path in [*csi.root.rglob("*"), csi.log]:
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            assert not any(form in content for form in secret_forms), path


def test_wrong_bytes_served_before_a_restart_are_found_when_the_blob_commits(node: Path, fixtures: Fixtures,
                                                                             registry) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(SIZE)
    fixtures.raw_model("restart/wrong:v1", {"weights.safetensors": data})  # no chunk index
    proxy = GatedProxy(registry.host, ProxyBehaviour(corrupt_ranges=True))  # whole GETs stay right
    csi = plugin(node, "--config", str(_private_config(node)), "--metrics-address", "127.0.0.1:0")
    try:
        target = kubelet_target(node / "pods", POD_UID, "wrong")
        request = inline_request("wrong", target, f"{proxy.host}/restart/wrong:v1", mount="lazy")
        csi.node.NodePublishVolume(request)
        served = _read(target / "weights.safetensors", 8 << 20, 4096)
        assert served != data[8 << 20:(8 << 20) + 4096]  # a reader got a wrong byte (and cannot know yet)
        blob = csi.root / "blobs" / "sha256" / sha(data)
        server = helper_pid(csi, target)
        _kill_plugin(csi)
        os.kill(server, signal.SIGKILL)
        wait_until(lambda: not alive(server), 10, "the server to end")
        assert not blob.exists()  # the gate holds the download: nobody has compared anything yet

        csi.start()
        wait_until(lambda: "ModelVolumeRestored" in csi.log_text(), 60, "the restore")
        proxy.gate.set()
        wait_until(blob.exists, 120, "the resumed download to commit")
        wait_until(lambda: "ModelIntegrityFailure" in csi.log_text(), 60, "the integrity failure")
        assert "bytes served before the pull finished differ" in csi.log_text()
        with pytest.raises(OSError) as info:
            _read(target / "weights.safetensors", 0, 4096)
        assert info.value.errno == errno.EIO
        assert mounts_at(target)[-1].fstype == FUSE  # the finished tree is not stacked on it
        assert list((csi.root / "lazy" / "served").glob("*.broken.json"))
        stats = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id=request.volume_id,
                                                                              volume_path=str(target)))
        assert stats.volume_condition.abnormal and "failed verification" in stats.volume_condition.message
        port = re.findall(r"metrics on port (\d+)", csi.log_text())[-1]
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "ocimodel_csi_lazy_integrity_failures_total 1.0" in metrics
        _unpublish(csi, "wrong", target)
        assert not target.exists()
    finally:
        proxy.gate.set()
        stop_all(csi)
        proxy.close()
