"""Lazy (FUSE) mounts through the real CSI server: real /dev/fuse, a real registry behind a proxy (one whose
gate holds the background download for as long as a test needs it unfinished), real reads, mmap, concurrent
readers, registry loss and recovery, integrity failure, strict mode, driver restarts and stale mounts."""

from __future__ import annotations

import errno
import json
import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from modelcache.assemble.options import PullOptions
from modelcache.digest import Digest
from modelcache.mounts import mounts_at
from modelcache.push import push_directory
from modelcache.records import tree_key
from modelcache.registry import mediatypes as mt
from modelcache.registry.reference import parse_reference
from modelcache.settings import HostsConfig, Settings
from modelcache.singleflight import PullFlights
from tests.conftest import make_client, needs_root
from tests.helpers.csi import CsiProcess, helper_pid, is_mounted, publish_request, unmount_all_under
from tests.helpers.oci import Entry, Fixtures, make_tar
from tests.helpers.procs import alive, children_running, open_files
from tests.helpers.proxy import ProxyProcess
from tests.helpers.waiting import ends, wait_for

pytestmark = [needs_root, pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")]
SIZE = 24 << 20


@pytest.fixture
def big(fixtures: Fixtures) -> tuple[str, bytes]:
    data = os.urandom(SIZE)
    fixtures.raw_model("lazy/model:v1", {"weights.safetensors": data, "config.json": b'{"lazy": true}'})
    return "lazy/model:v1", data


@pytest.fixture
def proxy_factory(proxy_process):  # type: ignore[no-untyped-def]
    return proxy_process


@pytest.fixture
def csi(tmp_path: Path) -> Iterator[CsiProcess]:
    process = CsiProcess(tmp_path)
    yield process
    unmount_all_under(tmp_path)
    if process.process and process.process.poll() is None:
        process.stop()


def lazy_request(volume: str, target: Path, ref: str, **attributes: str) -> csi_pb2.NodePublishVolumeRequest:
    return publish_request(volume, target, ref, mount="lazy", **attributes)


def wait_until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_reads_before_the_download_finishes(csi: CsiProcess, tmp_path: Path, big, proxy_factory) -> None:
    name, data = big
    proxy = proxy_factory(gate=True)  # the weights' download waits until the gate opens; reads' ranges pass
    target = tmp_path / "pod" / "mnt"
    target.parent.mkdir()
    csi.node.NodePublishVolume(lazy_request("lazy-1", target, f"{proxy.host}/{name}"), timeout=60)  # not waiting
    assert sorted(os.listdir(target)) == ["config.json", "weights.safetensors"]
    assert (target / "weights.safetensors").stat().st_size == SIZE
    with open(target / "weights.safetensors", "rb") as handle:
        handle.seek(SIZE - (1 << 20))
        tail = handle.read(1 << 20)
    assert tail == data[-(1 << 20):]
    assert not csi.root.joinpath("blobs", "sha256", Digest.of_bytes(data).hex).exists()  # the gate holds it
    assert (target / "config.json").read_bytes() == b'{"lazy": true}'
    stats = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id="lazy-1", volume_path=str(target)))
    assert not stats.volume_condition.abnormal
    assert {u.unit: u.used for u in stats.usage}[csi_pb2.VolumeUsage.BYTES] == SIZE + len(b'{"lazy": true}')
    with pytest.raises(OSError) as info:
        os.open(target / "weights.safetensors", os.O_RDWR)
    assert info.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError) as info:
        (target / "new").write_bytes(b"x")
    assert info.value.errno in (errno.EROFS, errno.EACCES)

    # mmap, as safetensors loaders do, and concurrent readers at different offsets
    with open(target / "weights.safetensors", "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        assert mapped[5_000_000:5_100_000] == data[5_000_000:5_100_000]
        mapped.close()

    def read_at(offset: int) -> bool:
        with open(target / "weights.safetensors", "rb") as h:
            h.seek(offset)
            return h.read(300_000) == data[offset:offset + 300_000]
    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(read_at, [0, 3_000_000, 9_000_000, 14_000_000, 18_000_000, SIZE - 300_000]))

    # once complete, the finished tree is stacked over the FUSE mount and reads are local
    assert mounts_top_is_fuse(target)  # every read above was served while the download was held
    proxy.open_gate()
    wait_until(lambda: csi.root.joinpath("blobs", "sha256", Digest.of_bytes(data).hex).exists(), 90)
    wait_until(lambda: sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
                           if line.split()[4] == str(target)) == 2, 30)
    assert (target / "weights.safetensors").read_bytes() == data
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="lazy-1", target_path=str(target)))
    assert not is_mounted(target) and not target.exists()
    assert not list((csi.root / "lazy").glob("*.part"))


def test_cached_model_is_bind_mounted_even_when_lazy(csi: CsiProcess, tmp_path: Path, big, fixtures) -> None:
    name, data = big
    first = tmp_path / "a"
    csi.node.NodePublishVolume(publish_request("bind", first, fixtures.ref(name)))
    second = tmp_path / "b"
    csi.node.NodePublishVolume(lazy_request("lazy", second, fixtures.ref(name)))
    fstypes = [line.split(" - ")[1].split()[0] for line in Path("/proc/self/mountinfo").read_text().splitlines()
               if line.split()[4] == str(second)]
    assert fstypes and "fuse" not in fstypes[0]
    assert (second / "weights.safetensors").stat().st_ino == (first / "weights.safetensors").stat().st_ino


def test_registry_loss_gives_eio_in_bounded_time_and_recovers(csi: CsiProcess, tmp_path: Path, big,
                                                               registry) -> None:
    name, data = big
    proxy = ProxyProcess(registry.host, gate=True)  # no byte of the weights is downloaded before it goes
    port = int(proxy.host.rsplit(":", 1)[1])
    target = tmp_path / "mnt"
    try:
        csi.node.NodePublishVolume(lazy_request("lazy-2", target, f"{proxy.host}/{name}"))
    finally:
        proxy.close()  # the registry goes away

    def read_the_middle() -> None:
        with open(target / "weights.safetensors", "rb") as handle:
            handle.seek(SIZE // 2)
            handle.read(1 << 20)
    failed = ends(read_the_middle)  # an error once the tries are spent, never a read that blocks for good
    assert isinstance(failed, OSError) and failed.errno == errno.EIO, failed
    back = ProxyProcess(registry.host, port=port)
    try:
        with open(target / "weights.safetensors", "rb") as handle:
            handle.seek(SIZE // 2)
            assert handle.read(1 << 20) == data[SIZE // 2: SIZE // 2 + (1 << 20)]
        wait_until(lambda: csi.root.joinpath("blobs", "sha256", Digest.of_bytes(data).hex).exists(), 90)
        wait_until(lambda: mounts_at(target)[-1].fstype != "fuse.ocimodel", 90)  # stacked before teardown
    finally:
        back.close()


def test_corrupt_blob_turns_reads_into_eio(csi: CsiProcess, tmp_path: Path, big, proxy_factory) -> None:
    name, _ = big
    proxy = proxy_factory(corrupt=True)
    target = tmp_path / "mnt"
    csi.node.NodePublishVolume(lazy_request("lazy-3", target, f"{proxy.host}/{name}"))
    log = next((csi.root / "csi" / "lazy").glob("*.log"))
    wait_until(lambda: "THE LAZY MOUNT NOW ANSWERS EIO" in log.read_text(), 60)
    with pytest.raises(OSError) as info:
        (target / "weights.safetensors").read_bytes()
    assert info.value.errno == errno.EIO


def test_strict_mode_serves_only_verified_blobs(csi: CsiProcess, tmp_path: Path, big, proxy_factory) -> None:
    name, data = big
    proxy = proxy_factory(8_000_000)
    target = tmp_path / "mnt"
    csi.node.NodePublishVolume(lazy_request("lazy-4", target, f"{proxy.host}/{name}", lazyVerify="strict"))
    with open(target / "weights.safetensors", "rb") as handle:
        handle.seek(SIZE - 100)
        assert handle.read() == data[-100:]
    assert csi.root.joinpath("blobs", "sha256", Digest.of_bytes(data).hex).exists()
    chunk_reads = [r for r in proxy.requests() if r["range"] and not r["range"].endswith("-")]
    assert chunk_reads == []  # strict mode never served unverified chunks


def test_mount_survives_a_driver_restart(csi: CsiProcess, tmp_path: Path, big, proxy_factory) -> None:
    name, data = big
    proxy = proxy_factory(1_000_000)
    target = tmp_path / "mnt"
    request = lazy_request("lazy-5", target, f"{proxy.host}/{name}")
    csi.node.NodePublishVolume(request)
    csi.restart(signal.SIGKILL)
    assert f"adopted lazy volume lazy-5 at {target}" in csi.log_text()
    with open(target / "weights.safetensors", "rb") as handle:
        assert handle.read(1000) == data[:1000]
    csi.node.NodePublishVolume(request)  # idempotent after the restart
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="lazy-5", target_path=str(target)))
    assert not is_mounted(target)


def test_stale_fuse_mount_without_a_record_is_cleaned_at_start(csi: CsiProcess, tmp_path: Path, big,
                                                               proxy_factory) -> None:
    name, _ = big
    proxy = proxy_factory(1_000_000)
    target = tmp_path / "mnt"
    csi.node.NodePublishVolume(lazy_request("lazy-6", target, f"{proxy.host}/{name}"))
    record_path = next((csi.root / "csi" / "publications").glob("*.json"))
    helper = helper_pid(csi, target)
    csi.stop()
    os.kill(helper, signal.SIGKILL)
    record_path.unlink()  # a mount this driver has no record of (lazy mounts with a record are restored)
    wait_until(lambda: not alive(helper), 60)
    with pytest.raises(OSError) as info:
        os.listdir(target)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)  # "transport endpoint is not connected"
    csi.start()
    assert "which has no record" in csi.log_text()
    assert not is_mounted(target)
    code = grpc.StatusCode.OK
    try:
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="lazy-6", target_path=str(target)))
    except grpc.RpcError as exc:
        code = exc.code()
    assert code == grpc.StatusCode.OK


def test_uncompressed_tar_is_lazy_and_compressed_tar_appears_when_pulled(csi: CsiProcess, tmp_path: Path,
                                                                         fixtures: Fixtures, proxy_factory) -> None:
    payload = os.urandom(3 << 20)
    fixtures.tar_model("lazy/tar:v1", [Entry("dir/a.bin", payload), Entry("b.txt", b"bee")], mt.Compression.TAR)
    fixtures.tar_model("lazy/tgz:v1", [Entry("c.txt", b"sea")], mt.Compression.TAR_GZIP)
    proxy = proxy_factory(500_000)
    tar_target = tmp_path / "tar"
    csi.node.NodePublishVolume(lazy_request("tar", tar_target, f"{proxy.host}/lazy/tar:v1"))
    assert sorted(os.listdir(tar_target)) == ["b.txt", "dir"]
    assert (tar_target / "b.txt").read_bytes() == b"bee"
    with open(tar_target / "dir" / "a.bin", "rb") as handle:
        handle.seek(len(payload) - 4096)
        assert handle.read() == payload[-4096:]
    tgz_target = tmp_path / "tgz"
    csi.node.NodePublishVolume(lazy_request("tgz", tgz_target, fixtures.ref("lazy/tgz:v1").replace(
        fixtures.host, proxy.host)))
    assert os.listdir(tgz_target) == ["c.txt"]  # waits for the layer
    assert (tgz_target / "c.txt").read_bytes() == b"sea"


def test_announced_tar_layers_are_listed_at_once_and_read_through_the_mount(
        csi: CsiProcess, tmp_path: Path, fixtures: Fixtures, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    """A model pushed one tar layer per file (each announcing its file, as modctl and ``ocimodel push`` write
    them) through a slow front: the mount lists every file with its size and mode while the pull runs, and
    each file reads as pushed; a layer holding another file than it announces reads as EIO."""
    model = tmp_path / "model"
    files = {"config.json": b'{"a": 1}', "sub/tokenizer.json": os.urandom(5000), "run.sh": b"#!/bin/sh\n"}
    for relpath, data in files.items():
        (model / relpath).parent.mkdir(parents=True, exist_ok=True)
        (model / relpath).write_bytes(data)
    (model / "run.sh").chmod(0o755)
    push_directory(make_client(), model, parse_reference(fixtures.ref("lazy/announced:v1")),
                   compression=mt.Compression.TAR, pack_small=False)
    proxy = proxy_factory(200_000)
    target = tmp_path / "announced"
    csi.node.NodePublishVolume(lazy_request("announced", target, f"{proxy.host}/lazy/announced:v1"))
    assert sorted(os.listdir(target)) == ["config.json", "run.sh", "sub"]
    assert {path: os.stat(target / path).st_size for path in files} == {p: len(d) for p, d in files.items()}
    assert oct(os.stat(target / "run.sh").st_mode & 0o777) == oct(0o555)
    assert {path: (target / path).read_bytes() for path in files} == files
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="announced", target_path=str(target)))
    assert not is_mounted(target)

    lie = {mt.ANNOTATION_FILEPATH: "a.json", mt.ANNOTATION_FILE_METADATA: json.dumps({"size": 10, "typeflag": 48})}
    fixtures.manifest("lazy/lie:v1", [fixtures.layer("lazy/lie", make_tar([Entry("b.json", b"x" * 10)]),
                                                     mt.model_layer_type("weight", mt.Compression.TAR), lie)])
    lying = tmp_path / "lying"
    csi.node.NodePublishVolume(lazy_request("lying", lying, f"{proxy.host}/lazy/lie:v1"))
    assert os.listdir(lying) == ["a.json"]
    with pytest.raises(OSError) as info:
        (lying / "a.json").read_bytes()
    assert info.value.errno == errno.EIO


def test_wrong_range_answers_are_caught_when_the_blob_commits(tmp_path: Path, big, proxy_factory) -> None:
    """The floor without a chunk index: a cache in front of the registry answers ranges with wrong bytes
    while whole-blob GETs are right. Once the blob is verified, the served chunks are compared with it:
    every further read fails, the plugin logs it, counts it, and records an Event on the pod."""
    import re

    import requests

    from tests.helpers.fakekube import FakeKubeAPI, write_kubeconfig
    name, data = big
    api = FakeKubeAPI()
    api.route("POST", "/api/v1/namespaces/inference/events", lambda r: (201, r.body))
    csi = CsiProcess(tmp_path / "driver", "--metrics-address", "127.0.0.1:0",
                     kubeconfig=str(write_kubeconfig(tmp_path / "kubeconfig", api.url)))
    proxy = proxy_factory(corrupt_ranges=True, gate=True)  # the whole-blob download (right bytes) waits
    target = tmp_path / "mnt"
    request = lazy_request("lazy-bad", target, f"{proxy.host}/{name}", **{
        "csi.storage.k8s.io/pod.namespace": "inference", "csi.storage.k8s.io/pod.name": "llm-0",
        "csi.storage.k8s.io/pod.uid": "uid-1"})
    try:
        csi.node.NodePublishVolume(request)
        early = os.open(target / "weights.safetensors", os.O_RDONLY)  # held open across the verdict
        served = os.pread(early, 4096, 0)
        assert served != data[:4096]  # served from a (wrong) range answer: the pull is held, nothing to compare
        assert not csi.root.joinpath("blobs", "sha256", Digest.of_bytes(data).hex).exists()
        proxy.open_gate()
        wait_until(lambda: any(r.body["reason"] == "ModelIntegrityFailure" for r in api.requests
                               if r.method == "POST"), 60)
        event = next(r.body for r in api.requests if r.method == "POST")
        assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "inference",
                                           "name": "llm-0", "uid": "uid-1"}
        assert event["type"] == "Warning" and "differ from the verified blob" in event["message"]
        # the server learns it from the committer's marker, within a second, and drops the kernel's cached
        # pages of the view: the handle opened before the verdict, whose wrong bytes were cached, fails too
        server_log = next((csi.root / "csi" / "lazy").glob("*.log"))
        wait_until(lambda: "cached pages of" in server_log.read_text(), 60)
        with pytest.raises(OSError) as info, open(target / "weights.safetensors", "rb") as handle:
            handle.read(4096)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            os.pread(early, 4096, 0)  # its pages were cached before the verdict
        assert info.value.errno == errno.EIO
        os.close(early)
        assert mounts_top_is_fuse(target)  # the verified tree is not stacked over a mount that served bad bytes
        stats = csi.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(volume_id="lazy-bad",
                                                                             volume_path=str(target)))
        assert stats.volume_condition.abnormal and "failed verification" in stats.volume_condition.message
        port = int(re.findall(r"metrics on port (\d+)", csi.log_text())[-1])
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "ocimodel_csi_lazy_integrity_failures_total 1.0" in metrics
        assert re.search(r"ERROR .*lazy volume lazy-bad .*failed verification", csi.log_text())
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="lazy-bad",
                                                                        target_path=str(target)))
    finally:
        csi.stop()
        api.close()
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)  # its server ends with it


def mounts_top_is_fuse(target: Path) -> bool:
    lines = [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    mine = [fields for fields in lines if fields[4] == str(target)]
    return bool(mine) and mine[-1][mine[-1].index("-") + 1] == "fuse.ocimodel"


def test_a_range_answered_for_another_offset_is_never_served(csi: CsiProcess, tmp_path: Path, big,
                                                              proxy_factory) -> None:
    name, data = big
    proxy = proxy_factory(shift_ranges=4096, gate=True)  # the download is held: the read is by range
    target = tmp_path / "mnt"
    csi.node.NodePublishVolume(lazy_request("lazy-shift", target, f"{proxy.host}/{name}"))
    with pytest.raises(OSError) as info, open(target / "weights.safetensors", "rb") as handle:
        handle.seek(8 << 20)
        handle.read(4096)
    assert info.value.errno == errno.EIO
    assert any("instead" in log.read_text() for log in (tmp_path / "root" / "csi" / "lazy").glob("*.log"))
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="lazy-shift", target_path=str(target)))


def test_cli_mount_lazy_strict(tmp_path: Path, big, proxy_factory) -> None:
    name, data = big
    proxy = proxy_factory(4_000_000)
    target, root = tmp_path / "cli-mnt", tmp_path / "cli-root"
    cli = [sys.executable, "-m", "ocimodel.cli"]
    out = subprocess.run([*cli, "mount", "--lazy", "--lazy-verify", "strict", f"{proxy.host}/{name}", str(target),
                          "--root", str(root), "--plain-http"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    try:
        record = json.loads(next((root / "csi" / "publications").glob("*.json")).read_text())
        assert record["strict"] is True and record["mount"] == "lazy"
        with open(target / "weights.safetensors", "rb") as handle:
            handle.seek(SIZE - 4096)
            assert handle.read() == data[-4096:]
        ranges = [r for r in proxy.requests() if r["range"] and not r["range"].endswith("-")]
        assert ranges == []  # strict: nothing was served from an unverified range
    finally:
        out = subprocess.run([*cli, "umount", str(target), "--root", str(root)], capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run([*cli, "mount", "--lazy-verify", "strict", f"{proxy.host}/{name}", str(target), "--root",
                          str(root), "--plain-http"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lazy-verify needs --lazy" in bad.stderr


def test_reads_behind_the_download_come_from_it(tmp_path: Path, big, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    """The plugin's download, started at publish, is the only one: the server starts no download process of
    its own while the plugin's runs; a reader behind it reads what it wrote (no second fetch of those
    bytes)."""
    name, data = big
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"rangedMinSizeMiB": 1, "connectionsPerBlob": 2}))
    csi = CsiProcess(tmp_path / "driver", "--config", str(config))
    proxy = proxy_factory(hold_from=20 << 20)  # the lead and the pieces stop at 20 MiB until the gate opens
    target = tmp_path / "pod" / "mnt"
    target.parent.mkdir()
    digest = Digest.of_bytes(data)
    state = csi.root / "ingest" / f"sha256-{digest.hex}.ranged.json"
    try:
        csi.node.NodePublishVolume(lazy_request("live", target, f"{proxy.host}/{name}"))
        wait_until(lambda: state.exists() and any(s == 0 and e >= 8 << 20
                                                  for s, e in json.loads(state.read_text())["filled"]), 60)
        with open(target / "weights.safetensors", "rb") as handle:
            assert handle.read(8 << 20) == data[:8 << 20]  # behind the download
            assert handle.read(1 << 20) == data[8 << 20:9 << 20]
        assert not csi.root.joinpath("blobs", "sha256", digest.hex).exists()  # held at 20 MiB
        blob_requests = [r for r in proxy.requests() if r["path"].endswith(str(digest))]
        assert not any(r["range"].startswith("bytes=0-") for r in blob_requests), blob_requests  # not fetched twice
        assert not children_running(helper_pid(csi, target), b"fuse-pull"), "a second download process"
        proxy.open_gate()
        wait_until(lambda: csi.root.joinpath("blobs", "sha256", digest.hex).exists(), 90)
        assert (target / "weights.safetensors").read_bytes() == data
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="live", target_path=str(target)))
    finally:
        csi.stop()


def test_a_pull_is_marked_from_its_start_for_lazy_servers(tmp_path: Path, big, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    """A pull of a model is marked across processes while it runs, so that a lazy server leaves the download
    to it; the mark ends with it."""
    name, _ = big
    proxy = proxy_factory(gate=True)  # the pull cannot finish until the gate opens
    flights = PullFlights(Settings(root=tmp_path / "cache", hosts=HostsConfig(plain_http=True)))
    reference = parse_reference(f"{proxy.host}/{name}")
    pinned = flights.resolve(reference, None)
    assert pinned.digest is not None
    key = tree_key(pinned.digest, PullOptions())
    check = [sys.executable, "-c", "import sys; from pathlib import Path; from modelcache.store.content import "
             "ContentStore; print(ContentStore(Path(sys.argv[1])).pull_in_progress(sys.argv[2]))",
             str(tmp_path / "cache"), key]
    try:
        assert subprocess.run(check, capture_output=True, text=True, check=True).stdout.strip() == "False"
        flight = flights.start(pinned, PullOptions(), None, "")
        wait_for(lambda: subprocess.run(check, capture_output=True, text=True, check=True).stdout.strip() == "True",
                 "the running pull to be marked")
        proxy.open_gate()
        flight.future.result(120)
        wait_for(lambda: not flights.cache.store.pull_in_progress(key), "the mark to end with the pull")
    finally:
        flights.shutdown()


def test_the_download_child_ends_with_its_helper(csi: CsiProcess, tmp_path: Path, big, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    """A lazy mount's own download (once the plugin that started one has died) runs in a child of its
    helper; if the helper dies (even by kill -9), the child stops too (its partial download stays, to be
    resumed), rather than running on unowned."""
    name, _ = big
    proxy = proxy_factory(gate=True)  # the download never ends by itself: only the helper's end stops it
    target = tmp_path / "pod" / "mnt"
    target.parent.mkdir()
    csi.node.NodePublishVolume(lazy_request("orphan", target, f"{proxy.host}/{name}"))
    helper = helper_pid(csi, target)
    assert csi.process is not None
    csi.process.kill()  # the plugin's download and its locks end: the server takes the download over
    csi.process.wait(60)
    children: list[int] = []

    def found_the_download_child() -> bool:
        children[:] = children_running(helper, b"fuse-pull")  # exec'd: a child just forked shows fuse-serve
        return bool(children)
    wait_until(found_the_download_child, 60)
    os.kill(helper, signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in children), 60)
    subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def _fuse_device(target: Path) -> str:
    """The major:minor of the FUSE mount at ``target`` (its bdi's name)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(target) and fields[fields.index("-") + 1] == "fuse.ocimodel":
            return fields[2]
    raise AssertionError(f"no FUSE mount at {target}")


def _bytes_read(pid: int) -> int:
    """Bytes the process (a helper that serves a mount, so it runs) has read with read(2)/pread(2) and the
    like (its ``rchar``)."""
    return int(next(line.split()[1] for line in Path(f"/proc/{pid}/io").read_text().splitlines()
                    if line.startswith("rchar:")))


def test_full_reads_are_large_and_served_once(csi: CsiProcess, tmp_path: Path, big, proxy_factory) -> None:  # type: ignore[no-untyped-def]
    """A lazy mount reads ahead in 8 MiB windows (not the kernel's 128 KiB FUSE default); a blob committed
    while a handle is open is then read from the committed file (no request, no chunk file); a second read
    of the same handle comes from the kernel's page cache of the FUSE inode: the server reads nothing."""
    name, data = big
    proxy = proxy_factory(gate=True)
    target = tmp_path / "pod" / "mnt"
    target.parent.mkdir()
    csi.node.NodePublishVolume(lazy_request("full", target, f"{proxy.host}/{name}"))
    assert Path(f"/sys/class/bdi/{_fuse_device(target)}/read_ahead_kb").read_text().strip() == "8192"
    helper = helper_pid(csi, target)
    digest = Digest.of_bytes(data)
    handle = os.open(target / "weights.safetensors", os.O_RDONLY)
    try:
        assert os.fstat(handle).st_dev == os.stat(target).st_dev and mounts_top_is_fuse(target)  # a FUSE handle
        assert not csi.root.joinpath("blobs", "sha256", digest.hex).exists()  # opened before the commit
        proxy.open_gate()
        wait_until(lambda: csi.root.joinpath("blobs", "sha256", digest.hex).exists(), 60)
        asked = len(proxy.requests())
        assert os.pread(handle, SIZE, 0) == data  # the first read through the FUSE handle
        assert len(proxy.requests()) == asked  # no byte fetched again: the committed blob served it
        assert str(csi.root / "blobs" / "sha256" / digest.hex) in open_files(helper)
        before = _bytes_read(helper)
        assert os.pread(handle, SIZE, 0) == data  # again: from the FUSE inode's page cache
        assert _bytes_read(helper) - before < SIZE // 8  # FUSE requests only (none for the data), no blob read
    finally:
        os.close(handle)
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="full", target_path=str(target)))
