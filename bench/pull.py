"""Cold pull throughput, each reference measured in the same run on the same data:

- loopback: ``ocimodel pull`` vs ``curl --parallel`` of the same blobs to disk with a final sync vs
  ``skopeo copy`` to an oci: layout (page cache dropped before each, tools taking turns, medians of
  ``--repeats`` runs), plus the cached second pull;
- throttled: a front that limits each connection (as object-storage-backed registries and CDNs do),
  a model of two shards: ocimodel's ranged downloads vs curl with one connection per blob.

Before every measured run the benchmark writes and deletes a file as large as the pull (``prefault``): on a
virtual machine, guest memory touched for the first time costs a hypervisor fault per page, which made
whichever tool ran first up to 2x slower in page-cache writes; now every tool starts on the same warmed
free memory.

Usage (root, for dropping caches): python bench/pull.py [--gib 2] [--shards 4] [--throttled-mib 256]
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
from pathlib import Path
from typing import Any

from common import OCIMODEL, RunningRegistry, drop_caches, make_shards, prefault, start_registry, timed, warm

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


def loopback(registry: RunningRegistry, work: Path, shards: int, shard_bytes: int, repeats: int) -> dict[str, Any]:
    """Each tool ``repeats`` times, taking turns, on the same warmed free memory; medians reported."""
    ref, blobs, total = push(registry, work, "model", shards, shard_bytes)

    def prepare() -> None:
        prefault(total + (256 << 20), work)
        drop_caches()
        warm(registry.root / "data")

    def ocimodel(out: Path) -> tuple[float, int]:
        return timed([*OCIMODEL, "pull", ref, "--plain-http", "--root", str(out)])

    def curl(out: Path) -> tuple[float, int]:
        return curl_to_disk(registry.host, "model", blobs, out)

    def skopeo(out: Path) -> tuple[float, int]:
        return timed(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:v1"])

    tools = {"ocimodel": ocimodel, "curl_parallel_with_sync": curl}
    if shutil.which("skopeo"):
        tools["skopeo"] = skopeo
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in tools}
    for _ in range(repeats):
        for name, run in tools.items():
            out = work / f"out-{name}"
            prepare()
            runs[name].append(run(out))
            if name == "ocimodel":
                results_cached = timed([*OCIMODEL, "pull", ref, "--plain-http", "--root", str(out)])[0]
            shutil.rmtree(out)
    results: dict[str, Any] = {"bytes": total, "shards": shards, "repeats": repeats}
    for name, measured in runs.items():
        seconds = statistics.median(s for s, _ in measured)
        results[name] = {"seconds": seconds, "mb_s": total / seconds / 1e6, "all_seconds": [s for s, _ in measured],
                         "peak_rss_mb": max(r for _, r in measured) / 1e6}
    results["ocimodel_cached_cli_seconds"] = results_cached
    results["ratio_vs_curl"] = results["ocimodel"]["mb_s"] / results["curl_parallel_with_sync"]["mb_s"]
    if "skopeo" in results:
        results["ratio_vs_skopeo"] = results["ocimodel"]["mb_s"] / results["skopeo"]["mb_s"]
    return results


def throttled(registry: RunningRegistry, work: Path, shard_bytes: int, rate: float) -> dict[str, Any]:
    ref, blobs, total = push(registry, work, "throttled", 2, shard_bytes)
    proxy = ProxyProcess(registry.host, bytes_per_second=rate)
    try:
        prefault(total + (256 << 20), work)
        drop_caches()
        warm(registry.root / "data")
        seconds, rss = timed([*OCIMODEL, "pull", ref.replace(registry.host, proxy.host), "--plain-http", "--root",
                              str(work / "throttled-cache")])
        prefault(total + (256 << 20), work)
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
    parser.add_argument("--repeats", type=int, default=3, help="loopback runs per tool (median reported)")
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
                summary["loopback"] = loopback(registry, work, args.shards, shard_bytes, args.repeats)
            if "throttled" in cases:
                summary["throttled"] = throttled(registry, work, args.throttled_mib << 20, args.per_connection)
        finally:
            registry.stop()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
