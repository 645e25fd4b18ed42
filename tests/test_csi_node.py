"""CSI Node and Identity services, walked through the spec tables over real gRPC against the real server
process, with real bind mounts (root) and a real registry."""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from modelcache.digest import Digest
from tests.conftest import PASSWORD, USER, needs_root
from tests.helpers.csi import (
    CsiProcess,
    Mode,
    block_capability,
    code_of,
    is_mounted,
    mount_capability,
    publish_request,
    publish_until_done,
)
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import GatedProxy, ProxyBehaviour

pytestmark = needs_root
OK, INVALID, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
ALREADY = grpc.StatusCode.ALREADY_EXISTS


@pytest.fixture
def csi(tmp_path: Path) -> Iterator[CsiProcess]:
    process = CsiProcess(tmp_path)
    yield process
    for target in (tmp_path / "pods").glob("*/mnt") if (tmp_path / "pods").exists() else []:
        while is_mounted(target):
            subprocess.run(["umount", str(target)], check=False)
    if process.process and process.process.poll() is None:
        process.stop()


@pytest.fixture
def model(fixtures: Fixtures) -> tuple[str, dict[str, bytes]]:
    files = {"model.safetensors": os.urandom(200_000), "config.json": b'{"a": 1}'}
    fixtures.raw_model("csi/model:v1", files)
    return fixtures.ref("csi/model:v1"), files


def target(tmp_path: Path, name: str = "pod1") -> Path:
    (tmp_path / "pods" / name).mkdir(parents=True, exist_ok=True)
    return tmp_path / "pods" / name / "mnt"


# -- Identity ---------------------------------------------------------------------------------------------

def test_plugin_info_and_probe(csi: CsiProcess) -> None:
    info = csi.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "ocimodel.csi.dev" and len(info.name) <= 63 and info.vendor_version
    assert csi.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_capabilities_are_the_same_in_every_mode(csi: CsiProcess, tmp_path: Path) -> None:
    controller = CsiProcess(tmp_path, mode="controller")
    try:
        a = csi.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
        b = controller.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest())
        assert a == b and a.capabilities[0].service.type == csi_pb2.PluginCapability.Service.CONTROLLER_SERVICE
        assert code_of(controller.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest()) == grpc.StatusCode.UNIMPLEMENTED
    finally:
        controller.stop()


def test_node_info_and_capabilities(csi: CsiProcess) -> None:
    assert csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "node-a"
    types = {c.rpc.type for c in csi.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities}
    assert csi_pb2.NodeServiceCapability.RPC.GET_VOLUME_STATS in types
    assert csi_pb2.NodeServiceCapability.RPC.STAGE_UNSTAGE_VOLUME not in types


# -- NodePublishVolume argument checks ---------------------------------------------------------------------

def test_publish_invalid_arguments(csi: CsiProcess, tmp_path: Path, model) -> None:
    ref, _ = model
    t = target(tmp_path)
    good = publish_request("v1", t, ref)
    cases = {
        "no volume id": csi_pb2.NodePublishVolumeRequest(target_path=str(t), volume_capability=mount_capability(),
                                                         volume_context={"reference": ref}),
        "no target": csi_pb2.NodePublishVolumeRequest(volume_id="v1", volume_capability=mount_capability(),
                                                      volume_context={"reference": ref}),
        "no capability": csi_pb2.NodePublishVolumeRequest(volume_id="v1", target_path=str(t),
                                                          volume_context={"reference": ref}),
        "no reference": csi_pb2.NodePublishVolumeRequest(volume_id="v1", target_path=str(t),
                                                         volume_capability=mount_capability()),
        "block": publish_request("v1", t, ref, capability=block_capability()),
        "multi writer": publish_request("v1", t, ref, capability=mount_capability(Mode.MULTI_NODE_MULTI_WRITER)),
        "unknown mount type": publish_request("v1", t, ref, mount="overlay"),
        "bad lazyVerify": publish_request("v1", t, ref, mount="lazy", lazyVerify="sometimes"),
        "unknown attribute": publish_request("v1", t, ref, colour="blue"),
        "bad reference": publish_request("v1", t, "Not A Reference"),
        "relative target": publish_request("v1", "relative/path", ref),
        "bad secret": publish_request("v1", t, ref, secrets={"token": "x"}),
    }
    for name, request in cases.items():
        assert code_of(csi.node.NodePublishVolume, request) == INVALID, name
    assert not t.exists()
    assert code_of(csi.node.NodePublishVolume, good) == OK


def test_lazy_is_refused_clearly_where_fuse_is_unavailable() -> None:
    from csi_driver.attributes import parse_volume_context
    from csi_driver.errors import CsiError
    with pytest.raises(CsiError) as info:
        parse_volume_context({"reference": "r.io/m:v1", "mount": "lazy"}, lazy_supported=False)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "lazy" in info.value.message and "bind" in info.value.message


# -- publish / unpublish behaviour -------------------------------------------------------------------------

@pytest.mark.parametrize("readonly", [True, False])
def test_publish_mounts_read_only_and_unpublish_removes(csi: CsiProcess, tmp_path: Path, model, readonly) -> None:
    ref, files = model
    t = target(tmp_path)
    csi.node.NodePublishVolume(publish_request("vol-1", t, ref, readonly=readonly,
                                               capability=mount_capability(Mode.SINGLE_NODE_WRITER)))
    assert is_mounted(t)
    assert {p.name: p.read_bytes() for p in t.iterdir()} == files
    with pytest.raises(OSError) as info:
        (t / "config.json").write_bytes(b"overwrite")
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError) as info:
        (t / "new-file").write_bytes(b"x")
    assert info.value.errno == errno.EROFS
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(t)))
    assert not is_mounted(t) and not t.exists()
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(t)))


def test_publish_is_idempotent_and_conflicts_are_already_exists(csi: CsiProcess, tmp_path: Path, model,
                                                                 fixtures: Fixtures) -> None:
    ref, _ = model
    fixtures.raw_model("csi/other:v1", {"x": b"other"})
    t = target(tmp_path)
    request = publish_request("vol-1", t, ref)
    csi.node.NodePublishVolume(request)
    csi.node.NodePublishVolume(request)
    mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
    assert sum(1 for line in mountinfo if line.split()[4] == str(t)) == 1
    assert code_of(csi.node.NodePublishVolume, publish_request("vol-2", t, ref)) == ALREADY
    assert code_of(csi.node.NodePublishVolume, publish_request("vol-1", t, ref, readonly=False)) == ALREADY
    assert code_of(csi.node.NodePublishVolume, publish_request("vol-1", t, fixtures.ref("csi/other:v1"))) == ALREADY
    assert code_of(csi.node.NodePublishVolume, publish_request("vol-1", t, ref, include="*.json")) == ALREADY
    other_mode = publish_request("vol-1", t, ref, capability=mount_capability(Mode.MULTI_NODE_READER_ONLY))
    assert code_of(csi.node.NodePublishVolume, other_mode) == ALREADY


def test_foreign_mount_at_target_is_already_exists(csi: CsiProcess, tmp_path: Path, model) -> None:
    t = target(tmp_path)
    t.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(t)], check=True)
    try:
        assert code_of(csi.node.NodePublishVolume, publish_request("vol-1", t, model[0])) == ALREADY
    finally:
        subprocess.run(["umount", str(t)], check=True)


def test_unpublish_unknown_target_is_ok_and_arguments_checked(csi: CsiProcess, tmp_path: Path) -> None:
    request = csi_pb2.NodeUnpublishVolumeRequest(volume_id="nope", target_path=str(tmp_path / "never"))
    assert code_of(csi.node.NodeUnpublishVolume, request) == OK
    assert code_of(csi.node.NodeUnpublishVolume,
                   csi_pb2.NodeUnpublishVolumeRequest(target_path=str(tmp_path))) == INVALID
    assert code_of(csi.node.NodeUnpublishVolume, csi_pb2.NodeUnpublishVolumeRequest(volume_id="x")) == INVALID


def test_ephemeral_inline_volume_with_pod_info(csi: CsiProcess, tmp_path: Path, model) -> None:
    t = target(tmp_path)
    request = publish_request("csi-abc123", t, model[0], readonly=False,
                              capability=mount_capability(Mode.SINGLE_NODE_WRITER),
                              **{"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "p",
                                 "csi.storage.k8s.io/pod.namespace": "ns", "csi.storage.k8s.io/pod.uid": "u",
                                 "csi.storage.k8s.io/serviceAccount.name": "default"})
    csi.node.NodePublishVolume(request)
    assert (t / "config.json").read_bytes() == b'{"a": 1}'
    records = list((csi.root / "csi" / "publications").glob("*.json"))
    record = json.loads(records[0].read_text())
    assert record["ephemeral"] is True and record["pod"] == "ns/p"


def test_many_pods_share_one_cached_copy(csi: CsiProcess, tmp_path: Path, model) -> None:
    ref, files = model
    targets = [target(tmp_path, f"pod{i}") for i in range(5)]
    for i, t in enumerate(targets):
        csi.node.NodePublishVolume(publish_request(f"vol-{i}", t, ref))
    inodes = {(t / "model.safetensors").stat().st_ino for t in targets}
    assert len(inodes) == 1
    assert len(list((csi.root / "trees").iterdir())) == 1


def test_volume_stats(csi: CsiProcess, tmp_path: Path, model) -> None:
    ref, files = model
    t = target(tmp_path)
    csi.node.NodePublishVolume(publish_request("vol-1", t, ref))
    stats = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-1", volume_path=str(t)))
    by_unit = {u.unit: u for u in stats.usage}
    assert by_unit[csi_pb2.VolumeUsage.BYTES].used == sum(len(v) for v in files.values())
    assert by_unit[csi_pb2.VolumeUsage.INODES].used == len(files)
    assert not stats.volume_condition.abnormal
    for request, code in [
        (csi_pb2.NodeGetVolumeStatsRequest(volume_path=str(t)), INVALID),
        (csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-1"), INVALID),
        (csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-1", volume_path=str(tmp_path / "missing")), NOT_FOUND),
        (csi_pb2.NodeGetVolumeStatsRequest(volume_id="other", volume_path=str(t)), NOT_FOUND),
    ]:
        assert code_of(csi.node.NodeGetVolumeStats, request) == code


# -- registry errors map to codes ---------------------------------------------------------------------------

def test_registry_errors_map_to_codes(csi: CsiProcess, tmp_path: Path, fixtures: Fixtures) -> None:
    t = target(tmp_path)
    fixtures.raw_model("csi/exists:v1", {"w": b"1"})
    assert code_of(csi.node.NodePublishVolume, publish_request("v", t, fixtures.ref("csi/exists:nope"))) == NOT_FOUND
    assert code_of(csi.node.NodePublishVolume,
                   publish_request("v", t, "127.0.0.1:9/x/y:v1"), timeout=60) == grpc.StatusCode.UNAVAILABLE
    assert not t.exists()


def test_integrity_and_unsafe_content_codes(csi: CsiProcess, tmp_path: Path, fixtures: Fixtures,
                                            proxy_factory) -> None:
    from modelcache.registry import mediatypes as mt
    from tests.helpers.oci import Entry
    fixtures.tar_model("csi/evil:v1", [Entry("../escape", b"x")], mt.Compression.TAR)
    code = code_of(csi.node.NodePublishVolume, publish_request("v", target(tmp_path), fixtures.ref("csi/evil:v1")))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    fixtures.raw_model("csi/corrupt:v1", {"w": os.urandom(10_000)})
    proxy = proxy_factory(ProxyBehaviour(corrupt_blobs=True))
    code = code_of(csi.node.NodePublishVolume, publish_request("v", target(tmp_path, "p2"),
                                                               f"{proxy.host}/csi/corrupt:v1"))
    assert code == grpc.StatusCode.DATA_LOSS


# -- credentials ------------------------------------------------------------------------------------------

def test_private_registry_secrets_and_access_recheck(csi: CsiProcess, tmp_path: Path, auth_fixtures: Fixtures) -> None:
    ref = auth_fixtures.ref("private/csi:v1")
    auth_fixtures.raw_model("private/csi:v1", {"w": b"private weights"})
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert code_of(csi.node.NodePublishVolume, publish_request("v0", target(tmp_path, "p0"), ref)) == unauth
    wrong = {"username": USER, "password": "wrong-password"}
    assert code_of(csi.node.NodePublishVolume, publish_request("v0", target(tmp_path, "p0"), ref,
                                                               secrets=wrong)) == unauth
    good = {"username": USER, "password": PASSWORD}
    csi.node.NodePublishVolume(publish_request("v1", target(tmp_path, "p1"), ref, secrets=good))
    assert (target(tmp_path, "p1") / "w").read_bytes() == b"private weights"
    # the model is now cached; a volume without valid credentials still may not see it
    assert code_of(csi.node.NodePublishVolume, publish_request("v2", target(tmp_path, "p2"), ref)) == unauth
    assert code_of(csi.node.NodePublishVolume, publish_request("v3", target(tmp_path, "p3"), ref,
                                                               secrets=wrong)) == unauth
    assert not target(tmp_path, "p2").exists() and not target(tmp_path, "p3").exists()
    dockercfg = json.dumps({"auths": {auth_fixtures.host: {
        "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}})
    csi.node.NodePublishVolume(publish_request("v4", target(tmp_path, "p4"), ref,
                                               secrets={".dockerconfigjson": dockercfg}))
    log = csi.log_text()
    assert PASSWORD not in log and "wrong-password" not in log
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in log
    assert "NodePublishVolume request" in log  # requests were logged, redacted


# -- long pulls ------------------------------------------------------------------------------------------

def test_slow_pull_answers_aborted_and_retries_join_it(tmp_path: Path, fixtures: Fixtures, registry) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(6_000_000)
    fixtures.raw_model("csi/slow:v1", {"w": data})
    proxy = GatedProxy(registry.host, hold_from=1_000_000)  # the pull stays under way until the gate opens
    csi = CsiProcess(tmp_path, "--publish-wait", "0.5")
    try:
        ref = f"{proxy.host}/csi/slow:v1"
        t = target(tmp_path)
        with pytest.raises(grpc.RpcError) as info:
            csi.node.NodePublishVolume(publish_request("v1", t, ref))
        assert info.value.code() == grpc.StatusCode.ABORTED
        assert "background" in info.value.details() and "bytes" in info.value.details()
        assert code_of(csi.node.NodePublishVolume, publish_request("v1", t, ref)) == grpc.StatusCode.ABORTED  # a retry
        proxy.gate.set()
        publish_until_done(csi, publish_request("v1", t, ref))
        assert (t / "w").read_bytes() == data
        assert proxy.stats.blob_gets[str(Digest.of_bytes(data))] == 1  # the retries joined the one pull
    finally:
        proxy.gate.set()
        proxy.close()
        subprocess.run(["umount", str(target(tmp_path))], check=False)
        csi.stop()


def test_concurrent_publishes_of_one_model_download_once(tmp_path: Path, fixtures: Fixtures, proxy_factory) -> None:
    files = {f"shard-{i}": os.urandom(1_000_000) for i in range(3)}
    fixtures.raw_model("csi/many:v1", files)
    proxy = proxy_factory(ProxyBehaviour(bytes_per_second=10_000_000))
    csi = CsiProcess(tmp_path, "--publish-wait", "1")
    ref = f"{proxy.host}/csi/many:v1"
    try:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: publish_until_done(csi, publish_request(f"v{i}", target(tmp_path, f"p{i}"), ref)),
                          range(8)))
        for data in files.values():
            assert proxy.stats.blob_gets[str(Digest.of_bytes(data))] == 1
        assert all((target(tmp_path, f"p{i}") / "shard-0").read_bytes() == files["shard-0"] for i in range(8))
    finally:
        for i in range(8):
            subprocess.run(["umount", str(target(tmp_path, f"p{i}"))], check=False, capture_output=True)
        csi.stop()


# -- restart safety --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_keeps_publications(csi: CsiProcess, tmp_path: Path, model, sig) -> None:
    ref, files = model
    t = target(tmp_path)
    request = publish_request("vol-1", t, ref)
    csi.node.NodePublishVolume(request)
    csi.restart(sig)
    assert is_mounted(t)
    csi.node.NodePublishVolume(request)
    assert code_of(csi.node.NodePublishVolume, publish_request("vol-2", t, ref)) == ALREADY
    stats = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id="vol-1", volume_path=str(t)))
    assert stats.usage
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-1", target_path=str(t)))
    assert not is_mounted(t) and not t.exists()
    assert list((csi.root / "csi" / "publications").iterdir()) == []


def test_orphaned_mounts_are_reported_at_start(csi: CsiProcess, tmp_path: Path, model) -> None:
    t = target(tmp_path)
    csi.node.NodePublishVolume(publish_request("vol-1", t, model[0]))
    csi.stop()
    for record in (csi.root / "csi" / "publications").iterdir():
        record.unlink()
    csi.start()
    assert f"orphaned mount at {t}" in csi.log_text()
    subprocess.run(["umount", str(t)], check=True)


def test_metrics_count_operations_and_pulls(tmp_path: Path, model) -> None:
    import re
    import socket

    import requests
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    csi = CsiProcess(tmp_path, "--metrics-address", f"127.0.0.1:{port}")
    try:
        t = target(tmp_path)
        csi.node.NodePublishVolume(publish_request("vol-m", t, model[0]))
        code_of(csi.node.NodePublishVolume, publish_request("vol-m", t, "Bad Ref"))
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert re.search(r'^ocimodel_csi_operations_total\{code="OK",method="NodePublishVolume"\} 1\.0$', text, re.M)
        assert re.search(r'^ocimodel_csi_operations_total\{code="INVALID_ARGUMENT",method="NodePublishVolume"\} 1',
                         text, re.M)
        assert re.search(r"^ocimodel_pulls_succeeded_total 1\.0$", text, re.M)
        assert re.search(r"^ocimodel_pulled_bytes_total [1-9]", text, re.M)
        assert 'ocimodel_csi_operation_duration_seconds_bucket{le="0.005",method="NodePublishVolume"}' in text
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="vol-m", target_path=str(t)))
    finally:
        csi.stop()
