"""Cold pull throughput, each reference measured in the same run on the same data:

- loopback, for every model size (``--sizes``, GiB; ``--large`` adds 8) and shard count (``--shards``):
  ``ocimodel pull`` in its own process vs ``curl --parallel`` of the same blobs to disk (one connection per
  blob) with a final sync vs ``skopeo copy`` to an oci: layout; page cache dropped before each run, tools
  taking turns, best of ``--repeats``: MB/s, the ratios, CPU seconds per GB (user and sys, from the rusage
  of each process) and peak RSS of each, plus the cached second pull;
- small-files: a model of 2,000 files of 4 KiB and one 64 MiB shard, pushed one layer per file (2,001
  layers; ``--pack-small never``) and packed (its default, 2 layers): ocimodel vs skopeo vs curl with as
  many connections as ocimodel uses for small blobs, best of ``--repeats``;
- throttled: a front that limits each connection (as object-storage-backed registries and CDNs do),
  a model of two shards: ocimodel's ranged downloads vs curl with one connection per blob.

Before every measured run the benchmark writes and deletes a file as large as the pull (``prefault``): on a
virtual machine, guest memory touched for the first time costs a hypervisor fault per page, which made
whichever tool ran first up to 2x slower in page-cache writes; now every tool starts on the same warmed
free memory.

Usage (root, for dropping caches): python bench/pull.py [--sizes 1] [--shards 4] [--large] [--repeats 2]
[--cases loopback,small-files,throttled]; the default run takes about 4 minutes on a 2-core VM, ``--shards 1,4
--large`` about half an hour.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    OCIMODEL,
    Run,
    RunningRegistry,
    drop_caches,
    make_shards,
    measure,
    prefault,
    start_registry,
    warm,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from modelcache.assemble.pull import SMALL_BLOB_WORKERS  # noqa: E402
from tests.helpers.proxy import ProxyProcess  # noqa: E402

SMALL_FILES, SMALL_FILE_BYTES, SMALL_SHARD_BYTES = 2000, 4096, 64 << 20
Tool = Callable[[Path], Run]


def push(registry: RunningRegistry, model: Path, name: str, *extra: str) -> tuple[str, list[str], int]:
    """Push the directory ``model``; return its reference, blob digests and total size."""
    ref = f"{registry.host}/bench/{name}:v1"
    subprocess.run([*OCIMODEL, "push", str(model), ref, "--plain-http", *extra], check=True, capture_output=True)
    manifest = json.loads(subprocess.run(
        ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
         f"http://{registry.host}/v2/bench/{name}/manifests/v1"], check=True, capture_output=True).stdout)
    return ref, [layer["digest"] for layer in manifest["layers"]], sum(layer["size"] for layer in manifest["layers"])


def curl_to_disk(host: str, name: str, blobs: list[str], out: Path, parallel: int = 0) -> Run:
    """curl --parallel (one connection per blob unless ``parallel``) to disk, then sync, timed together."""
    out.mkdir()
    cmd = ["curl", "-sf", "--parallel", "--parallel-immediate", "--parallel-max", str(parallel or len(blobs))]
    for digest in blobs:
        cmd += ["-o", str(out / digest.replace(":", "-")), f"http://{host}/v2/bench/{name}/blobs/{digest}"]
    run = measure(cmd)
    started = time.perf_counter()
    subprocess.run(["sync"], check=True)
    run.seconds += time.perf_counter() - started
    return run


def curl(host: str, name: str, blobs: list[str], parallel: int = 0) -> Tool:
    return lambda out: curl_to_disk(host, name, blobs, out, parallel)


def ocimodel(ref: str) -> Tool:
    return lambda out: measure([*OCIMODEL, "pull", ref, "--plain-http", "--root", str(out)])


def skopeo(ref: str) -> Tool:
    return lambda out: measure(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}", f"oci:{out}:v1"])


def compare(registry: RunningRegistry, work: Path, total: int, tools: dict[str, Tool], repeats: int,
            after: Callable[[str, Path], None] | None = None) -> dict[str, Any]:
    """Each tool ``repeats`` times, taking turns, from a cold page cache on the same warmed free memory; the
    best run of each (``after`` sees each tool's output before it is removed)."""
    runs: dict[str, list[Run]] = {name: [] for name in tools}
    for _ in range(repeats):
        for name, tool in tools.items():
            out = work / f"out-{name}"
            prefault(total + (256 << 20), work)
            drop_caches()
            warm(registry.root / "data")
            runs[name].append(tool(out))
            if after is not None:
                after(name, out)
            shutil.rmtree(out)
    results: dict[str, Any] = {}
    for name, measured in runs.items():
        best = min(measured, key=lambda run: run.seconds)
        results[name] = {"seconds": best.seconds, "mb_s": total / best.seconds / 1e6,
                         "all_seconds": [run.seconds for run in measured],
                         "cpu_user_s_per_gb": best.user / (total / 1e9), "cpu_sys_s_per_gb": best.sys / (total / 1e9),
                         "peak_rss_mb": best.peak_rss / 1e6}
    return results


def ratios(results: dict[str, Any]) -> None:
    """Add how many times faster ocimodel was than curl and skopeo (when measured)."""
    for key, other in (("ratio_vs_curl", "curl_parallel_with_sync"), ("ratio_vs_skopeo", "skopeo")):
        if other in results:
            results[key] = results["ocimodel"]["mb_s"] / results[other]["mb_s"]


def loopback(registry: RunningRegistry, work: Path, gib: float, shards: int, repeats: int) -> dict[str, Any]:
    name = f"model-{gib:g}g-{shards}"
    shard_bytes = int(gib * (1 << 30)) // shards // (1 << 20) * (1 << 20)
    model = make_shards(work / name, shards, shard_bytes)
    ref, blobs, total = push(registry, model, name)
    shutil.rmtree(model)
    tools = {"ocimodel": ocimodel(ref), "curl_parallel_with_sync": curl(registry.host, name, blobs)}
    if shutil.which("skopeo"):
        tools["skopeo"] = skopeo(ref)
    cached: list[float] = []

    def pull_again(tool: str, out: Path) -> None:
        if tool == "ocimodel":
            cached.append(measure([*OCIMODEL, "pull", ref, "--plain-http", "--root", str(out)]).seconds)
    results = {"bytes": total, "shards": shards, "repeats": repeats,
               **compare(registry, work, total, tools, repeats, pull_again)}
    results["ocimodel_cached_cli_seconds"] = min(cached)
    ratios(results)
    return results


def small_files(registry: RunningRegistry, work: Path, repeats: int) -> dict[str, Any]:
    """2,000 files of 4 KiB and a 64 MiB shard: one layer per file, and packed."""
    model = work / "small-files"
    model.mkdir()
    for i in range(SMALL_FILES):
        (model / f"file-{i:05d}.json").write_bytes(os.urandom(SMALL_FILE_BYTES))
    with open(model / "model.safetensors", "wb") as out:
        for _ in range(SMALL_SHARD_BYTES >> 20):
            out.write(os.urandom(1 << 20))
    results: dict[str, Any] = {}
    for label, extra in (("one_layer_per_file", ["--pack-small", "never"]), ("packed", [])):
        name = f"small-{label.replace('_', '-')}"
        ref, blobs, total = push(registry, model, name, *extra)
        tools = {"ocimodel": ocimodel(ref),
                 "curl_parallel_with_sync": curl(registry.host, name, blobs, min(len(blobs), SMALL_BLOB_WORKERS))}
        if shutil.which("skopeo"):
            tools["skopeo"] = skopeo(ref)
        case = {"layers": len(blobs), "bytes": total, **compare(registry, work, total, tools, repeats)}
        ratios(case)
        results[label] = case
    shutil.rmtree(model)
    results["ocimodel_packed_vs_one_layer_per_file"] = (results["one_layer_per_file"]["ocimodel"]["seconds"] /
                                                        results["packed"]["ocimodel"]["seconds"])
    return results


def throttled(registry: RunningRegistry, work: Path, shard_bytes: int, rate: float) -> dict[str, Any]:
    model = make_shards(work / "throttled", 2, shard_bytes)
    ref, blobs, total = push(registry, model, "throttled")
    shutil.rmtree(model)
    proxy = ProxyProcess(registry.host, bytes_per_second=rate)
    try:
        prefault(total + (256 << 20), work)
        drop_caches()
        warm(registry.root / "data")
        ours = ocimodel(ref.replace(registry.host, proxy.host))(work / "throttled-cache")
        prefault(total + (256 << 20), work)
        theirs = curl_to_disk(proxy.host, "throttled", blobs, work / "throttled-curl")
    finally:
        proxy.close()
    return {"bytes": total, "per_connection_bytes_s": rate,
            "ocimodel": {"seconds": ours.seconds, "mb_s": total / ours.seconds / 1e6,
                         "peak_rss_mb": ours.peak_rss / 1e6},
            "curl_one_connection_per_blob": {"seconds": theirs.seconds, "mb_s": total / theirs.seconds / 1e6,
                                             "peak_rss_mb": theirs.peak_rss / 1e6},
            "ratio_vs_curl": theirs.seconds / ours.seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1", help="model sizes in GiB, comma-separated")
    parser.add_argument("--shards", default="4", help="shard counts, comma-separated: each size with each count")
    parser.add_argument("--large", action="store_true", help="add an 8 GiB model to --sizes")
    parser.add_argument("--repeats", type=int, default=2, help="runs per tool (best reported)")
    parser.add_argument("--throttled-mib", type=int, default=256, help="size of each of the two throttled shards")
    parser.add_argument("--per-connection", type=float, default=10e6, help="bytes/s per connection of the front")
    parser.add_argument("--cases", default="loopback,small-files,throttled")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    sizes = [float(s) for s in args.sizes.split(",")] + ([8.0] if args.large else [])
    summary: dict[str, Any] = {"load_average_at_start": os.getloadavg()[0], "case_seconds": {}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-pull-", dir=args.workdir) as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            for case, run in (
                    ("loopback", lambda: [loopback(registry, work, gib, int(shards), args.repeats)
                                          for gib in sizes for shards in args.shards.split(",")]),
                    ("small-files", lambda: small_files(registry, work, args.repeats)),
                    ("throttled", lambda: throttled(registry, work, args.throttled_mib << 20, args.per_connection))):
                if case in cases:
                    case_started = time.perf_counter()
                    summary[case.replace("-", "_")] = run()
                    summary["case_seconds"][case] = time.perf_counter() - case_started
        finally:
            registry.stop()
    summary["bench_seconds"] = time.perf_counter() - started
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
