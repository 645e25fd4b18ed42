"""The node plugin's first busy day, with real processes: a burst of pods whose pulls a registry holds while
Probe must answer, SIGTERM with pulls in flight, a full cache filesystem (a real tmpfs), models removed
while a publish or a pull needs them. A download that must be unfinished is held by a gated proxy the test
opens; deadlines are hang guards only (latency goals are measured in bench/)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from csi_driver.server import QUICK_RPC_THREADS, RPC_THREADS
from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.records import tree_key
from modelcache.registry.reference import Reference, parse_reference
from modelcache.settings import Settings
from modelcache.singleflight import PullFlights
from modelcache.store.content import ContentStore
from modelcache.upkeep.gc import ModelInUse, collect_garbage, remove_model
from modelcache.upkeep.pins import Pins
from tests.conftest import make_client, needs_root
from tests.helpers.csi import CsiProcess, code_of, is_mounted, publish_request
from tests.helpers.fakekube import write_kubeconfig
from tests.helpers.oci import Fixtures
from tests.helpers.smallfs import small_filesystems
from tests.helpers.waiting import ends

pytestmark = needs_root
ABORTED, OK = grpc.StatusCode.ABORTED, grpc.StatusCode.OK


@pytest.fixture
def slow_proxy(proxy_process):  # type: ignore[no-untyped-def]
    return proxy_process


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[object]:
    """A real, small filesystem to fill up."""
    yield from small_filesystems(tmp_path)


def fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last block."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            block, written = b"\0" * size, size
            try:
                while written:
                    written = os.write(fd, block)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def unpublish(csi: CsiProcess, volume: str, target: Path) -> None:
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume, target_path=str(target)),
                                 timeout=30)


# -- 1. a burst of pods never starves Probe ----------------------------------------------------------------------

def _config(tmp_path: Path) -> Path:
    """A held download must not end by itself while a test holds it: a read time-out longer than any test."""
    config = tmp_path / "node.json"
    config.write_text(json.dumps({"readTimeoutSeconds": 900}))
    return config


def test_probe_and_quick_rpcs_answer_during_a_burst_of_publishes(tmp_path: Path, fixtures: Fixtures,
                                                                 slow_proxy) -> None:  # type: ignore[no-untyped-def]
    """Every publish slot waits on a pull the gate holds: Probe and the other quick RPCs still answer, on
    their reserved threads, while those publishes wait; then every model is fetched exactly once."""
    pods = 200
    slots = RPC_THREADS - QUICK_RPC_THREADS  # publishes that may wait at once; the rest are ABORTED at once
    weights = [os.urandom(8_000) + str(i).encode() for i in range(pods)]
    for i, data in enumerate(weights):
        fixtures.raw_model(f"burst/m{i}:v1", {"w.bin": data})
    proxy = slow_proxy(hold_from=0)  # every blob waits for the gate
    csi = CsiProcess(tmp_path, "--config", str(_config(tmp_path)), verbose=False)
    requests_ = [publish_request(f"vol-{i}", tmp_path / "pods" / f"p{i}" / "mnt", f"{proxy.host}/burst/m{i}:v1")
                 for i in range(pods)]
    quick = {
        "Probe": lambda: csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=60),
        "NodeGetCapabilities": lambda: csi.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest(), timeout=60),
        "NodeGetInfo": lambda: csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=60),
        "NodeUnpublishVolume": lambda: csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id="gone", target_path=str(tmp_path / "nowhere")), timeout=60),
        "NodeGetVolumeStats": lambda: code_of(csi.node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(
            volume_id="vol-0", volume_path=str(tmp_path)), timeout=60),
    }
    missed: list[str] = []
    done = threading.Event()
    one_asker = threading.Lock()  # two unpublishes of one target at once: the second is rightly ABORTED

    def ask_all() -> None:
        with one_asker:
            for name, call in quick.items():
                try:
                    call()
                except grpc.RpcError as exc:  # the 60 s deadline is a hang guard: missing it is never answering
                    missed.append(f"{name}: {exc.code()}")

    def keep_asking() -> None:
        while not done.wait(0.02):
            ask_all()

    pool = ThreadPoolExecutor(max_workers=pods)  # every pod's first publish at once
    prober = threading.Thread(target=keep_asking)
    try:
        prober.start()
        first = [pool.submit(code_of, csi.node.NodePublishVolume, r, 300) for r in requests_]
        deadline = time.monotonic() + 120  # a hang guard
        while sum(f.done() for f in first) < pods - slots:
            assert time.monotonic() < deadline, f"{sum(f.done() for f in first)} publishes answered"
            time.sleep(0.1)
        assert {f.result() for f in first if f.done()} == {ABORTED}  # no slot free: answered at once
        ask_all()  # every slot is held by a publish waiting on a held pull ...
        waiting = [f for f in first if not f.done()]
        assert len(waiting) == slots  # ... and still was when the quick RPCs had answered
        assert not missed, missed
        proxy.open_gate()
        codes = [f.result() for f in first]
        pending = [r for r, code in zip(requests_, codes, strict=True) if code != OK]
        deadline = time.monotonic() + 240
        while pending and time.monotonic() < deadline:  # kubelet retries with backoff; retries join the pulls
            time.sleep(0.5)
            pending = [r for r in pending if code_of(csi.node.NodePublishVolume, r, timeout=120) != OK]
        done.set()
        prober.join()
        assert not pending, f"{len(pending)} volumes never published"
        assert not missed, missed  # the quick RPCs answered all through the burst (latency: bench/publish.py)
        assert all(is_mounted(r.target_path) for r in requests_)
        gets = Counter(r["path"].rsplit("/", 1)[1] for r in proxy.requests()
                       if "/blobs/" in r["path"] and r["method"] == "GET")
        assert [gets[f"sha256:{hashlib.sha256(data).hexdigest()}"] for data in weights] == [1] * pods
    finally:
        done.set()
        proxy.open_gate()
        pool.shutdown(wait=True)
        if prober.is_alive():
            prober.join()
        for r in requests_:
            if is_mounted(r.target_path):
                unpublish(csi, r.volume_id, Path(r.target_path))
        csi.stop()


# -- 2. SIGTERM ends every long-running process, without waiting for the pulls ------------------------------------

def test_sigterm_with_pulls_in_flight_stops_and_the_pull_resumes(tmp_path: Path, fixtures: Fixtures,
                                                                 slow_proxy) -> None:  # type: ignore[no-untyped-def]
    """The pull is held at 8 MiB for longer than the test (and cannot time out): the plugin ending at all
    shows it did not wait for the pull. How fast it ends (the goal: well within a pod's 30 s grace period)
    is measured in bench/, not asserted here."""
    data = os.urandom(48 << 20)
    fixtures.raw_model("term/model:v1", {"weights.bin": data})
    slow = slow_proxy(hold_from=8 << 20)
    csi = CsiProcess(tmp_path, "--publish-wait", "60", "--config", str(_config(tmp_path)))
    target = tmp_path / "pods" / "p" / "mnt"
    request = publish_request("vol-t", target, f"{slow.host}/term/model:v1")
    answers: list[grpc.StatusCode] = []
    waiting = threading.Thread(target=lambda: answers.append(code_of(csi.node.NodePublishVolume, request, 90)))
    waiting.start()
    partial = csi.root / "ingest" / f"sha256-{Digest.of_bytes(data).hex}"
    deadline = time.monotonic() + 60
    while not (partial.exists() and partial.stat().st_size > (4 << 20)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert partial.exists() and partial.stat().st_size > (4 << 20), "the download never started"
    assert csi.process is not None
    csi.process.send_signal(signal.SIGTERM)
    code = csi.process.wait(60)  # a hang guard: the held pull never ends by itself
    waiting.join(60)
    assert code == 0
    assert answers and answers[0] in (grpc.StatusCode.UNAVAILABLE, ABORTED)  # the waiting publish was answered
    kept = partial.stat().st_size
    assert 0 < kept < len(data)  # the partial download is kept for resuming
    fast = slow_proxy(0)
    csi.args = [a.replace(slow.host, fast.host) for a in csi.args]
    csi.start()
    resumed = publish_request("vol-t", target, f"{fast.host}/term/model:v1")
    deadline = time.monotonic() + 60
    while code_of(csi.node.NodePublishVolume, resumed) != OK and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (target / "weights.bin").read_bytes() == data
    ranges = [r["range"] for r in fast.requests() if r["range"]]
    assert ranges and int(ranges[0].split("=")[1].split("-")[0]) > 0  # it resumed, not restarted
    unpublish(csi, "vol-t", target)
    csi.stop()


def test_sigterm_stops_the_agent_during_a_pull(tmp_path: Path, fixtures: Fixtures,
                                               slow_proxy) -> None:  # type: ignore[no-untyped-def]
    from tests.test_agent import Cluster, modelcache
    fixtures.raw_model("term/agent:v1", {"weights.bin": os.urandom(32 << 20)})
    slow = slow_proxy(hold_from=4 << 20)  # the pull never ends by itself
    cluster = Cluster([modelcache("big", f"{slow.host}/term/agent:v1")], {})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.api.url)
    agent = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "agent", "--node-name", "node-a", "--kubeconfig",
                              str(kubeconfig), "--root", str(tmp_path / "root"), "--plain-http", "--metrics-address",
                              "127.0.0.1:0", "--config", str(_config(tmp_path))],
                             stdout=(tmp_path / "agent.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        ingest = tmp_path / "root" / "ingest"
        deadline = time.monotonic() + 60
        while not (ingest.is_dir() and any(p.stat().st_size > 0 for p in ingest.iterdir())):
            assert time.monotonic() < deadline, (tmp_path / "agent.log").read_text()[-2000:]
            time.sleep(0.1)
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)  # a hang guard: the held pull never ends by itself (how fast: bench/)
        assert any(p.stat().st_size > 0 for p in ingest.iterdir())  # resumable
    finally:
        if agent.poll() is None:
            agent.kill()
        cluster.api.close()


# -- 3. publish is atomic; unpublish works on a full disk --------------------------------------------------------

def test_publish_on_a_full_cache_leaves_nothing_and_unpublish_still_works(tmp_path: Path, fixtures: Fixtures,
                                                                          tmpfs) -> None:  # type: ignore[no-untyped-def]
    files = {"w.bin": os.urandom(200_000)}
    fixtures.raw_model("full/model:v1", files)
    ref = fixtures.ref("full/model:v1")
    root = tmpfs("cache", "16m")
    csi = CsiProcess(tmp_path / "driver", root=root)
    try:
        first = tmp_path / "pods" / "a" / "mnt"
        csi.node.NodePublishVolume(publish_request("vol-a", first, ref))
        filler = fill(root)
        second = tmp_path / "pods" / "b" / "mnt"
        with pytest.raises(grpc.RpcError) as info:
            csi.node.NodePublishVolume(publish_request("vol-b", second, ref))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value.details()
        assert not is_mounted(second) and not second.exists()  # nothing half-done
        assert len(list((root / "csi" / "publications").glob("*.json"))) == 1
        unpublish(csi, "vol-a", first)  # the disk is still full
        assert not is_mounted(first) and not first.exists()
        filler.unlink()
        csi.node.NodePublishVolume(publish_request("vol-b", second, ref))
        assert (second / "w.bin").read_bytes() == files["w.bin"]
        unpublish(csi, "vol-b", second)
    finally:
        csi.stop()


# -- 4. leases -------------------------------------------------------------------------------------------------------

def test_a_leased_model_is_never_removed_and_removal_never_waits(tmp_path: Path, fixtures: Fixtures) -> None:
    fixtures.raw_model("lease/model:v1", {"w": b"leased"})
    cache = ModelCache(ContentStore(tmp_path / "root"), make_client())
    result = cache.pull(fixtures.ref("lease/model:v1"))
    key = result.record.key
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from modelcache.store.content import ContentStore; from pathlib import Path\n"
        "with ContentStore(Path(sys.argv[1])).lease('tree-' + sys.argv[2]):\n"
        "    print('held', flush=True); sys.stdin.read()\n"), str(tmp_path / "root"), key],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # another process between lookup and mount
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    try:
        refused = ends(lambda: remove_model(cache, key), hang_guard=60)  # refused, never queued behind the lease
        assert isinstance(refused, ModelInUse), refused
        assert holder.poll() is None  # the lease was held all along
        from modelcache.upkeep.eviction import evict
        assert key in evict(cache, high=-1.0, low=0.0).blocked
        collect_garbage(cache)
        assert (result.path / "w").read_bytes() == b"leased"
        out = subprocess.run([sys.executable, "-m", "ocimodel.cli", "cache", "rm", key, "--root",
                              str(tmp_path / "root")], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "in use" in out.stderr
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    remove_model(cache, key)
    assert not result.path.exists()


def test_gc_and_rm_do_not_wait_for_a_running_pull(tmp_path: Path, fixtures: Fixtures,
                                                  slow_proxy) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(6 << 20)
    fixtures.raw_model("lease/slow:v1", {"weights.bin": data})
    fixtures.raw_model("lease/other:v1", {"w": b"other"})
    root = tmp_path / "root"
    other = ModelCache(ContentStore(root), make_client()).pull(fixtures.ref("lease/other:v1"))
    slow = slow_proxy(hold_from=1 << 20)  # the pull stays at 1 MiB until the gate opens
    puller = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "pull", f"{slow.host}/lease/slow:v1", "--root",
                               str(root), "--plain-http", "--json", "--config", str(_config(tmp_path))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ingest = root / "ingest" / f"sha256-{Digest.of_bytes(data).hex}"
    deadline = time.monotonic() + 60
    while not (ingest.exists() and ingest.stat().st_size > 0):
        assert time.monotonic() < deadline and puller.poll() is None
        time.sleep(0.05)
    for command in (["cache", "gc"], ["cache", "rm", other.record.key]):
        out = subprocess.run([sys.executable, "-m", "ocimodel.cli", *command, "--root", str(root)],
                             capture_output=True, text=True, timeout=120)  # a hang guard: a wait would be for good
        assert out.returncode == 0, out.stderr
        assert puller.poll() is None  # the pull is held: it ran all along
    slow.open_gate()
    stdout, _ = puller.communicate(timeout=120)
    assert puller.returncode == 0
    path = Path(json.loads(stdout)["path"])
    assert (path / "weights.bin").read_bytes() == data  # gc left the pull's blobs alone


# -- 5. a full disk evicts before it fails -------------------------------------------------------------------------

def test_a_full_cache_evicts_unused_models_before_failing(tmp_path: Path, fixtures: Fixtures, tmpfs) -> None:  # type: ignore[no-untyped-def]
    old, new = os.urandom(9 << 20), os.urandom(9 << 20)
    fixtures.raw_model("evict/old:v1", {"w.bin": old})
    fixtures.raw_model("evict/new:v1", {"w.bin": new})
    root = tmpfs("cache", "14m")
    settings = Settings(root=root)
    settings.hosts.plain_http = True
    flights = PullFlights(settings)
    try:
        first = flights.start(*_args(fixtures, "evict/old:v1")).future.result(60)
        Pins(root).pin("team/old", first.record.key)  # pinned: not evictable
        with pytest.raises(ModelCacheError) as info:
            flights.start(*_args(fixtures, "evict/new:v1")).future.result(60)
        assert info.value.kind is Kind.RESOURCE_EXHAUSTED and "none was evicted" in str(info.value)
        assert (first.path / "w.bin").read_bytes() == old  # the cache is intact
        Pins(root).unpin("team/old")
        second = flights.start(*_args(fixtures, "evict/new:v1")).future.result(60)
        assert (second.path / "w.bin").read_bytes() == new
        assert not first.path.exists()  # the least recently used model made room
        assert flights.cache.get_record(tree_key(Digest.parse(first.record.digest), PullOptions())) is None
    finally:
        flights.shutdown()


def _args(fixtures: Fixtures, name: str) -> tuple[Reference, PullOptions, None, str]:
    return parse_reference(fixtures.ref(name)), PullOptions(), None, ""
