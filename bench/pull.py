"""Cold pull throughput, each reference measured in the same run on the same data:

- loopback: ``ocimodel pull`` vs ``curl --parallel`` of the same blobs to disk with a final sync vs
  ``skopeo copy`` to an oci: layout (page cache dropped before each), plus the cached second pull;
- throttled: a front that limits each connection (as object-storage-backed registries and CDNs do),
  a model of two shards: ocimodel's ranged downloads vs curl with one connection per blob.

Usage (root, for dropping caches): python bench/pull.py [--gib 2] [--shards 4] [--throttled-mib 256]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import OCIMODEL, RunningRegistry, drop_caches, make_shards, start_registry, timed, warm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers.proxy import ProxyProcess  # noqa: E402


def push(registry: RunningRegistry, work: Path, name: str, shards: int, shard_bytes: int) -> tuple[str, list[str], int]:
    """Push a model of ``shards`` random shards; return its reference, blob digests and total size."""
    model = make_shards(work / name, shards, shard_bytes)
    ref = f"{registry.host}/bench/{name}:v1"
    subprocess.run([*OCIMODEL, "push", str(model), ref, "--plain-http"], check=True, capture_output=True)
    shutil.rmtree(model)
    manifest = json.loads(subprocess.run(
        ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
         f"http://{registry.host}/v2/bench/{name}/manifests/v1"], check=True, capture_output=True).stdout)
    return ref, [layer["digest"] for layer in manifest["layers"]], sum(layer["size"] for layer in manifest["layers"])


def curl_to_disk(host: str, name: str, blobs: list[str], out: Path) -> tuple[float, int]:
    """curl --parallel, one connection per blob, to disk, then sync: (seconds, peak RSS)."""
    out.mkdir()
    cmd = ["curl", "-sf", "--parallel", "--parallel-immediate", "--parallel-max", str(len(blobs))]
    for digest in blobs:
        cmd += ["-o", str(out / digest.replace(":", "-")), f"http://{host}/v2/bench/{name}/blobs/{digest}"]
    seconds, rss = timed(cmd)
    started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return seconds + time.perf_counter() - started, rss


def loopback(registry: RunningRegistry, work: Path, shards: int, shard_bytes: int) -> dict[str, Any]:
    ref, blobs, total = push(registry, work, "model", shards, shard_bytes)

    def prepare() -> None:
        drop_caches()
        warm(registry.root / "data")

    results: dict[str, Any] = {"bytes": total, "shards": shards}
    prepare()
    root = work / "cache"
    seconds, rss = timed([*OCIMODEL, "pull", ref, "--plain-http", "--root", str(root)])
    results["ocimodel"] = {"seconds": seconds, "mb_s": total / seconds / 1e6, "peak_rss_mb": rss / 1e6}
    seconds, _ = timed([*OCIMODEL, "pull", ref, "--plain-http", "--root", str(root)])
    results["ocimodel_cached_cli_seconds"] = seconds
    prepare()
    seconds, rss = curl_to_disk(registry.host, "model", blobs, work / "curl")
    results["curl_parallel_with_sync"] = {"seconds": seconds, "mb_s": total / seconds / 1e6, "peak_rss_mb": rss / 1e6}
    if shutil.which("skopeo"):
        prepare()
        seconds, rss = timed(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}",
                              f"oci:{work / 'skopeo'}:v1"])
        results["skopeo"] = {"seconds": seconds, "mb_s": total / seconds / 1e6, "peak_rss_mb": rss / 1e6}
    results["ratio_vs_curl"] = results["ocimodel"]["mb_s"] / results["curl_parallel_with_sync"]["mb_s"]
    if "skopeo" in results:
        results["ratio_vs_skopeo"] = results["ocimodel"]["mb_s"] / results["skopeo"]["mb_s"]
    return results


def throttled(registry: RunningRegistry, work: Path, shard_bytes: int, rate: float) -> dict[str, Any]:
    ref, blobs, total = push(registry, work, "throttled", 2, shard_bytes)
    proxy = ProxyProcess(registry.host, bytes_per_second=rate)
    try:
        drop_caches()
        warm(registry.root / "data")
        seconds, rss = timed([*OCIMODEL, "pull", ref.replace(registry.host, proxy.host), "--plain-http", "--root",
                              str(work / "throttled-cache")])
        curl_seconds, curl_rss = curl_to_disk(proxy.host, "throttled", blobs, work / "throttled-curl")
    finally:
        proxy.close()
    return {"bytes": total, "per_connection_bytes_s": rate,
            "ocimodel": {"seconds": seconds, "mb_s": total / seconds / 1e6, "peak_rss_mb": rss / 1e6},
            "curl_one_connection_per_blob": {"seconds": curl_seconds, "mb_s": total / curl_seconds / 1e6,
                                             "peak_rss_mb": curl_rss / 1e6},
            "ratio_vs_curl": curl_seconds / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--throttled-mib", type=int, default=256, help="size of each of the two throttled shards")
    parser.add_argument("--per-connection", type=float, default=10e6, help="bytes/s per connection of the front")
    parser.add_argument("--cases", default="loopback,throttled")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    summary: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pull-", dir=args.workdir) as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            if "loopback" in cases:
                shard_bytes = int(args.gib * (1 << 30)) // args.shards // (1 << 20) * (1 << 20)
                summary["loopback"] = loopback(registry, work, args.shards, shard_bytes)
            if "throttled" in cases:
                summary["throttled"] = throttled(registry, work, args.throttled_mib << 20, args.per_connection)
        finally:
            registry.stop()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
