"""NodePublishVolume latency through the real gRPC server: a cached model (p50/p99 over N calls, a new
target each), and 16 concurrent publishes of one uncached model vs a single pull of it.

Usage (root): python bench/publish.py [--calls 200] [--gib 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import OCIMODEL, drop_caches, make_shards, start_registry, timed, warm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csi_driver.proto import csi_pb2  # noqa: E402
from tests.helpers.csi import CsiProcess, publish_request, publish_until_done  # noqa: E402
from tests.helpers.proxy import RegistryProxy  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--concurrent", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        proxy = RegistryProxy(registry.host)
        try:
            small = make_shards(work / "small", 2, 8 << 20)
            big = make_shards(work / "big", 4, int(args.gib * (1 << 30)) // 4 // (1 << 20) * (1 << 20))
            for directory, name in ((small, "small"), (big, "big"), (big, "big-single")):
                subprocess.run([*OCIMODEL, "push", str(directory), f"{registry.host}/bench/{name}:v1", "--plain-http"],
                               check=True, capture_output=True)
            total = sum(p.stat().st_size for p in big.iterdir())
            shutil.rmtree(small)
            shutil.rmtree(big)

            # 1. cached publishes: one warm-up pull, then N publishes to new targets
            csi = CsiProcess(work / "csi1", verbose=False)
            ref = f"{registry.host}/bench/small:v1"
            pods = work / "pods"
            pods.mkdir()
            publish_until_done(csi, publish_request("warm", pods / "warm", ref))
            latencies = []
            for i in range(args.calls):
                start = time.perf_counter()
                csi.node.NodePublishVolume(publish_request(f"v{i}", pods / f"t{i}", ref))
                latencies.append((time.perf_counter() - start) * 1000)
            for i in range(args.calls):
                csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=f"v{i}",
                                                                                target_path=str(pods / f"t{i}")))
            csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="warm",
                                                                            target_path=str(pods / "warm")))
            csi.stop()
            results["cached_publish_ms"] = {"p50": statistics.median(latencies), "p99": percentile(latencies, 99),
                                            "max": max(latencies), "calls": args.calls}

            # 2. one plain pull of the big model (reference time)
            drop_caches()
            warm(registry.root / "data")
            seconds, _ = timed([*OCIMODEL, "pull", f"{registry.host}/bench/big-single:v1", "--plain-http",
                                "--root", str(work / "single-root")])
            results["single_pull_seconds"] = seconds

            # 3. 16 concurrent publishes of the same uncached model (through a counting proxy)
            drop_caches()
            warm(registry.root / "data")
            csi = CsiProcess(work / "csi2", "--publish-wait", "100", verbose=False)
            big_ref = f"{proxy.host}/bench/big:v1"
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrent) as pool:
                list(pool.map(lambda i: publish_until_done(csi, publish_request(f"c{i}", pods / f"c{i}", big_ref)),
                              range(args.concurrent)))
            concurrent = time.perf_counter() - start
            for i in range(args.concurrent):
                csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=f"c{i}",
                                                                                target_path=str(pods / f"c{i}")))
            csi.stop()
            blob_gets = dict(proxy.stats.blob_gets)
            results["concurrent_publish"] = {
                "publishes": args.concurrent, "seconds": concurrent, "bytes": total,
                "ratio_to_single_pull": concurrent / seconds,
                "max_gets_per_blob": max(blob_gets.values()), "blobs": len(blob_gets)}
        finally:
            proxy.close()
            registry.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
