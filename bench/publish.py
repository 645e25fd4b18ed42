"""NodePublishVolume latency through the real gRPC server: a cached model (p50/p99 over N calls, a new
target each), unsigned and, side by side, signed under a signature policy that requires it; 16 concurrent
publishes of one uncached model vs a single pull of it; and a burst of distinct uncached models through a
throttled registry, with Probe's latency during the burst and the time until every volume is published vs
curl fetching the same blobs through the same throttle, four at a time (the plugin's pull parallelism).

Usage (root): python bench/publish.py [--calls 200] [--gib 1] [--burst 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import OCIMODEL, RunningRegistry, drop_caches, make_shards, start_registry, timed, warm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpc  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from csi_driver.proto import csi_pb2  # noqa: E402
from modelcache.digest import Digest  # noqa: E402
from tests.helpers.csi import CsiProcess, publish_like_kubelet, publish_request, publish_until_done  # noqa: E402
from tests.helpers.proxy import ProxyProcess, RegistryProxy  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--cases", default="cached,concurrent,burst", help="comma-separated cases to run")
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--burst-kib", type=int, default=256, help="size of each burst model")
    parser.add_argument("--throttle", type=float, default=1_000_000, help="bytes/s per blob response in the burst")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            if "cached" in cases:
                plain = results["cached_publish_ms"] = cached(work, registry.host, args.calls)
                signed = results["cached_signed_publish_ms"] = cached(work, registry.host, args.calls, signed=True)
                results["signed_vs_plain_p99"] = signed["p99"] / plain["p99"]
            if "concurrent" in cases:
                results.update(concurrent(work, registry, args.gib, args.concurrent))
            if "burst" in cases:
                results["burst"] = burst(work, registry.host, args.burst, args.burst_kib << 10, args.throttle)
        finally:
            registry.stop()
    print(json.dumps(results, indent=2))


def cached(work: Path, registry: str, calls: int, *, signed: bool = False) -> dict[str, float]:
    """Publishes of a cached model: one warm-up pull, then ``calls`` publishes to new targets; ``signed``:
    the model is signed (cosign tag scheme) and the node's signature policy requires it."""
    label = "signed" if signed else "small"
    small = make_shards(work / label, 2, 8 << 20)
    extra: list[str] = []
    node_config: list[str] = []
    if signed:
        key = ec.generate_private_key(ec.SECP256R1())
        (work / "release.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        (work / "release.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (work / "node.yaml").write_text(json.dumps({"signaturePolicy": [
            {"name": "bench", "match": [f"{registry}/bench/*"], "keys": [str(work / "release.pub")]}]}))
        extra, node_config = ["--sign-key", str(work / "release.key")], ["--config", str(work / "node.yaml")]
    subprocess.run([*OCIMODEL, "push", str(small), f"{registry}/bench/{label}:v1", "--plain-http", *extra],
                   check=True, capture_output=True)
    shutil.rmtree(small)
    csi = CsiProcess(work / f"csi-{label}", *node_config, verbose=False)
    ref = f"{registry}/bench/{label}:v1"
    pods = work / f"pods-{label}"
    pods.mkdir()
    publish_until_done(csi, publish_request("warm", pods / "warm", ref))
    latencies = []
    for i in range(calls):
        start = time.perf_counter()
        csi.node.NodePublishVolume(publish_request(f"v{i}", pods / f"t{i}", ref))
        latencies.append((time.perf_counter() - start) * 1000)
    for i in range(calls):
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=f"v{i}",
                                                                        target_path=str(pods / f"t{i}")))
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="warm", target_path=str(pods / "warm")))
    csi.stop()
    return {"p50": statistics.median(latencies), "p99": percentile(latencies, 99), "max": max(latencies),
            "calls": calls}


def concurrent(work: Path, registry: RunningRegistry, gib: float, count: int) -> dict[str, object]:
    """``count`` concurrent publishes of one uncached model (through a counting proxy) vs one plain pull."""
    big = make_shards(work / "big", 4, int(gib * (1 << 30)) // 4 // (1 << 20) * (1 << 20))
    for name in ("big", "big-single"):
        subprocess.run([*OCIMODEL, "push", str(big), f"{registry.host}/bench/{name}:v1", "--plain-http"], check=True,
                       capture_output=True)
    total = sum(p.stat().st_size for p in big.iterdir())
    shutil.rmtree(big)
    drop_caches()
    warm(registry.root / "data")
    seconds, _ = timed([*OCIMODEL, "pull", f"{registry.host}/bench/big-single:v1", "--plain-http",
                        "--root", str(work / "single-root")])
    drop_caches()
    warm(registry.root / "data")
    proxy = RegistryProxy(registry.host)
    csi = CsiProcess(work / "csi2", "--publish-wait", "100", verbose=False)
    big_ref = f"{proxy.host}/bench/big:v1"
    pods = work / "concurrent-pods"
    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda i: publish_until_done(csi, publish_request(f"c{i}", pods / f"c{i}", big_ref)),
                      range(count)))
    elapsed = time.perf_counter() - start
    for i in range(count):
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=f"c{i}",
                                                                        target_path=str(pods / f"c{i}")))
    csi.stop()
    blob_gets = dict(proxy.stats.blob_gets)
    proxy.close()
    return {"single_pull_seconds": seconds, "concurrent_publish": {
        "publishes": count, "seconds": elapsed, "bytes": total, "ratio_to_single_pull": elapsed / seconds,
        "max_gets_per_blob": max(blob_gets.values()), "blobs": len(blob_gets)}}


def burst(work: Path, registry: str, count: int, size: int, throttle: float) -> dict[str, object]:
    """``count`` pods at once, each naming another uncached model; kubelet-like retries until all publish."""
    blobs = []
    for i in range(count):
        directory = work / f"burst-{i}"
        directory.mkdir()
        (directory / "w.bin").write_bytes(os.urandom(size))
        subprocess.run([*OCIMODEL, "push", str(directory), f"{registry}/burst/m{i}:v1", "--plain-http"], check=True,
                       capture_output=True)
        blobs.append(f"/v2/burst/m{i}/blobs/{Digest.of_bytes((directory / 'w.bin').read_bytes())}")
        shutil.rmtree(directory)
    proxy = ProxyProcess(registry, bytes_per_second=throttle, log=str(work / "burst-proxy.log"))
    csi = CsiProcess(work / "csi-burst", verbose=False)
    pods = work / "burst-pods"
    requests_ = [publish_request(f"b{i}", pods / f"b{i}", f"{proxy.host}/burst/m{i}:v1") for i in range(count)]
    probes: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            try:
                csi.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
                probes.append((time.perf_counter() - start) * 1000)
            except grpc.RpcError:
                probes.append(float("inf"))
            time.sleep(0.01)

    prober = threading.Thread(target=probe)
    start = time.perf_counter()
    prober.start()
    with ThreadPoolExecutor(count) as pool:
        attempts = list(pool.map(lambda r: publish_like_kubelet(csi, r), requests_))
    published = time.perf_counter() - start
    done.set()
    prober.join()
    for r in requests_:
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=r.volume_id,
                                                                        target_path=r.target_path))
    csi.stop()

    def fetch(path: str) -> None:
        subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://{proxy.host}{path}"], check=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(fetch, blobs))
    curl_seconds = time.perf_counter() - start
    proxy.close()
    return {"pods": count, "model_bytes": size, "throttle_bytes_per_s": throttle,
            "probe_ms": {"p50": statistics.median(probes), "p99": percentile(probes, 99), "max": max(probes),
                         "samples": len(probes)},
            "seconds_until_all_published": published, "retries": {"max": max(attempts), "total": sum(attempts)},
            "curl_4_parallel_seconds": curl_seconds,
            "ratio_to_curl": published / curl_seconds}


if __name__ == "__main__":
    main()
