"""Parallel ranged downloads of large blobs: concurrent Range requests written at their offsets, verified
in order, resumed piece by piece after kill -9, and one stream where a registry ignores Range."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.records import PullResult
from modelcache.store.content import ContentStore
from modelcache.store.rangedingest import RangedIngest
from tests.conftest import make_client
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import GatedProxy, ProxyBehaviour, ProxyProcess

SIZE = 20 << 20


def ranged_cache(root: Path, connections: int = 4) -> ModelCache:
    return ModelCache(ContentStore(root), make_client(), connections_per_blob=connections, ranged_min_size=1 << 20)


@pytest.fixture
def big(fixtures: Fixtures) -> tuple[str, bytes]:
    data = os.urandom(SIZE)
    fixtures.raw_model("ranged/model:v1", {"shard.bin": data})
    return "ranged/model:v1", data


def ranges_of(requests: list[tuple[str, str, dict[str, str]]], digest: str) -> list[str]:
    return [h.get("range", "") for method, path, h in requests if method == "GET" and path.endswith(digest)]


def pull_waiting_lead(cache: ModelCache, proxy: GatedProxy, name: str, digest: str) -> PullResult:
    """Pull through ``proxy`` (holding every blob past 1 MiB) and open its gate once a Range request shows
    the split decided: the lead stream waits on the network during the probe however busy the machine is
    (a throttle leaves the lead runnable, and so busy, for much of it when other work takes the CPUs)."""
    with ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(cache.pull, f"{proxy.host}/{name}")
        deadline = time.monotonic() + 60
        while not any(ranges_of(proxy.stats.requests, digest)[1:]) and not pulling.done():
            assert time.monotonic() < deadline, "the lead stream was never split"
            time.sleep(0.05)
        proxy.gate.set()
        return pulling.result(timeout=120)


def test_a_large_blob_comes_in_concurrent_ranges(big, registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name, data = big
    proxy = GatedProxy(registry.host, hold_from=1 << 20)
    try:
        result = pull_waiting_lead(ranged_cache(tmp_path / "root"), proxy, name, str(Digest.of_bytes(data)))
    finally:
        proxy.gate.set()
        proxy.close()
    assert (result.path / "shard.bin").read_bytes() == data
    ranges = ranges_of(proxy.stats.requests, str(Digest.of_bytes(data)))
    assert ranges[0] == ""  # the lead stream is a plain GET ...
    starts = sorted(int(r.split("=")[1].split("-")[0]) for r in ranges[1:])
    assert len(starts) >= 4 and starts[0] > 0 and len(set(starts)) == len(starts)  # ... then distinct pieces
    assert not list((tmp_path / "root" / "ingest").iterdir())  # nothing left behind


def test_a_registry_that_ignores_range_gets_one_stream(big, proxy_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name, data = big
    proxy = proxy_factory(ProxyBehaviour(ignore_range=True))
    result = ranged_cache(tmp_path / "root").pull(f"{proxy.host}/{name}")
    assert (result.path / "shard.bin").read_bytes() == data
    assert not list((tmp_path / "root" / "ingest").iterdir())


def test_wrong_bytes_in_a_range_are_never_committed_and_one_stream_recovers(big, registry, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    name, data = big
    proxy = GatedProxy(registry.host, ProxyBehaviour(corrupt_ranges=True), hold_from=1 << 20)
    try:
        result = pull_waiting_lead(ranged_cache(tmp_path / "root"), proxy, name, str(Digest.of_bytes(data)))
    finally:
        proxy.gate.set()
        proxy.close()
    assert (result.path / "shard.bin").read_bytes() == data  # whole-blob GETs are right behind this cache
    ranges = ranges_of(proxy.stats.requests, str(Digest.of_bytes(data)))
    assert any(r.startswith("bytes=") for r in ranges) and ranges[-1] == ""  # pieces, then one stream
    assert "fetching blob" in caplog.text and "as one stream" in caplog.text
    assert not list((tmp_path / "root" / "ingest").iterdir())


def test_kill_9_resumes_with_the_pieces_already_on_disk(big, registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name, data = big
    root = tmp_path / "root"
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"connectionsPerBlob": 4, "rangedMinSizeMiB": 1}))
    # pieces past 12 MiB wait for a gate never opened: the pull cannot finish before the kill
    slow = ProxyProcess(registry.host, bytes_per_second=2_000_000, hold_from=12 << 20, log=str(tmp_path / "slow.log"))
    state = root / "ingest" / f"sha256-{Digest.of_bytes(data).hex}.ranged.json"
    pull = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "pull", f"{slow.host}/{name}", "--root", str(root),
                             "--plain-http", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (state.exists() and sum(e - s for s, e in json.loads(state.read_text())["filled"]) >= 4 << 20):
            assert time.monotonic() < deadline and pull.poll() is None
            time.sleep(0.05)
        pull.send_signal(signal.SIGKILL)
        pull.wait(60)
    finally:
        slow.close()
    saved = json.loads(state.read_text())
    fast = ProxyProcess(registry.host, log=str(tmp_path / "fast.log"))
    try:
        out = subprocess.run([sys.executable, "-m", "ocimodel.cli", "pull", f"{fast.host}/{name}", "--root", str(root),
                              "--plain-http", "--config", str(config), "--json"], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        assert (Path(json.loads(out.stdout)["path"]) / "shard.bin").read_bytes() == data
        asked = {int(r["range"].split("=")[1].split("-")[0]) for r in fast.requests() if r["range"]}
    finally:
        fast.close()
    assert asked and not any(s <= a < e for a in asked for s, e in saved["filled"])  # what was on disk stays
    assert not state.exists()


def _serve(data: bytes, calls: list[tuple[int, int]], *, busy: bool,  # type: ignore[no-untyped-def]
           hold_lead: bool = False):
    """A range source over ``data`` whose thread either computes (a CPU-bound stream) or waits (a registry
    that limits each connection) for every 256 KiB it hands over. With ``hold_lead`` the stream from byte 0
    waits after its first 256 KiB until other ranges are asked for: a lead that only waits, so that a busy
    machine (where a thread that keeps waking up is runnable much of the time) cannot make it look busy."""
    asked = threading.Event()  # a range other than the lead's was asked for

    def fetch(start: int, length: int, write) -> None:  # type: ignore[no-untyped-def]
        calls.append((start, length))
        if start != 0:
            asked.set()
        view = memoryview(data)
        for offset in range(start, start + length, 256 << 10):
            end = min(offset + (256 << 10), start + length)
            if busy:
                deadline = time.thread_time() + 0.004
                while time.thread_time() < deadline:
                    pass
            else:
                time.sleep(0.004)
            if hold_lead and start == 0 and offset > 0:
                asked.wait(60)  # blocked, not polling (a thread that keeps waking is runnable on a busy machine)
            write(offset, view[offset:end])
    return fetch


@pytest.mark.parametrize("busy", [True, False], ids=["cpu-bound lead: one stream", "waiting lead: split"])
def test_the_lead_stream_splits_only_when_it_waits_on_the_network(busy: bool, tmp_path: Path) -> None:
    data = os.urandom(48 << 20)
    calls: list[tuple[int, int]] = []
    ingest = RangedIngest(Digest.of_bytes(data), len(data), tmp_path / "partial", tmp_path / "state.json",
                          _serve(data, calls, busy=busy, hold_lead=not busy), workers=4, on_bytes=lambda n: None)
    assert ingest.run() == 0
    assert (tmp_path / "partial").read_bytes() == data
    assert calls[0] == (0, len(data))
    if busy:
        assert calls == [(0, len(data))] and ingest.split_into == 0
    else:
        assert ingest.split_into >= 4 and len(calls) == 1 + ingest.split_into
        assert sorted(calls)[1][0] == ingest.lead_end  # the lead stopped where the pieces begin
        assert sum(length for _, length in calls[1:]) == len(data) - ingest.lead_end


def test_the_node_wide_connection_limit_holds_across_ingests(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "root", max_connections=3)
    store.ensure()
    blobs = [os.urandom(48 << 20) for _ in range(2)]
    active, peak, lock = 0, 0, threading.Lock()

    def fetch_from(data: bytes):  # type: ignore[no-untyped-def]
        inner = _serve(data, [], busy=False, hold_lead=True)  # split for sure, even on a busy machine

        def fetch(start: int, length: int, write) -> None:  # type: ignore[no-untyped-def]
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            try:
                inner(start, length, write)
            finally:
                with lock:
                    active -= 1
        return fetch

    threads = [threading.Thread(target=store.ingest_ranged, args=(Digest.of_bytes(data), len(data), fetch_from(data)),
                                kwargs={"workers": 8, "on_bytes": lambda n: None}) for data in blobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak == 3  # 16 connections wanted, 3 allowed on the node
    assert all(store.blob_path(Digest.of_bytes(data)).read_bytes() == data for data in blobs)
