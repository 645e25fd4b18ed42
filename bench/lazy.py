"""Lazy mounts, two cases:

- ``publish``: time from the publish call to the first 1 MiB read at the end of a large file (lazy vs a
  full pull then bind mount), and sequential reads once the model is complete (through the mount, through
  a FUSE handle opened before completion, and directly from the cache);
- ``during-pull``: a whole shard read sequentially through the lazy mount right after publish, while the
  background pull is still running, cold (nothing cached) and warm (read again), for a model with a chunk
  index (each chunk verified before it is served) and without; the references are a direct read of the
  same file from the cache once complete, cold and warm, and the registry's line rate (curl of the blob to
  /dev/null, one connection), in the same run;
- ``full-load``: what an inference server does at start-up, for a model of two shards (``--shard-mib``, 384
  by default), with a chunk index and without: a sequential read of every file through the lazy mount
  started at publish, each file opened when its read starts (as loaders do: a file opened once the model is
  complete reads the finished tree stacked over the view), against publishing a plain (bind) volume, which
  pulls first, then reading the same files; the first MiB at the end of the last shard through a lazy
  mount; and once the pull is complete, a warm re-read through the FUSE handles opened at publish (the
  FUSE inodes' page cache) against a warm direct read of the cached files. Caches dropped and memory
  prefaulted before each cold run, the order of lazy and pull alternating, medians of ``--runs``.

Usage (root, /dev/fuse): python bench/lazy.py [--gib 2] [--cases publish,during-pull,full-load]
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
import time
from pathlib import Path

from common import OCIMODEL, RunningRegistry, drop_caches, make_shards, prefault, running_plugin, start_registry, warm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csi_driver.proto import csi_pb2  # noqa: E402
from tests.helpers.csi import CsiProcess, publish_request, publish_until_done  # noqa: E402


def read_file(path: Path, handle: int | None = None) -> float:
    buffer = bytearray(8 << 20)
    start = time.perf_counter()
    fd = handle if handle is not None else os.open(path, os.O_RDONLY)
    offset = 0
    while True:
        n = os.preadv(fd, [buffer], offset)
        if not n:
            break
        offset += n
    if handle is None:
        os.close(fd)
    return time.perf_counter() - start


def tail_read(path: Path) -> None:
    with open(path, "rb") as handle:
        handle.seek(-(1 << 20), os.SEEK_END)
        assert len(handle.read(1 << 20)) == 1 << 20


def during_pull(registry: RunningRegistry, work: Path, model: Path, name: str, size: int) -> dict[str, object]:
    results: dict[str, object] = {"file_bytes": size}
    for label, extra in (("with_index", []), ("without_index", ["--no-chunk-index"])):
        ref = f"{registry.host}/bench/during-{label.replace('_', '-')}:v1"
        subprocess.run([*OCIMODEL, "push", str(model), ref, "--plain-http", *extra], check=True, capture_output=True)
        drop_caches()
        warm(registry.root / "data")
        manifest = json.loads(subprocess.run(
            ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
             f"http://{registry.host}/v2/bench/during-{label.replace('_', '-')}/manifests/v1"],
            check=True, capture_output=True).stdout)
        blob = max(manifest["layers"], key=lambda layer: layer["size"])["digest"]
        started = time.perf_counter()
        subprocess.run(["curl", "-sf", "-o", "/dev/null", f"http://{registry.host}/v2/bench/"
                        f"during-{label.replace('_', '-')}/blobs/{blob}"], check=True)
        line_rate = size / (time.perf_counter() - started) / 1e9
        prefault(3 * size, work)  # the download, the FUSE page cache and the committed file (see bench/pull.py)
        drop_caches()
        warm(registry.root / "data")
        plugin = running_plugin(work / f"during-{label}")
        target = work / "pods" / f"during-{label}"
        target.parent.mkdir(exist_ok=True)
        plugin.node.NodePublishVolume(publish_request(label, target, ref, mount="lazy"))
        handle = os.open(target / name, os.O_RDONLY)
        cold = read_file(target / name, handle)
        trees = plugin.root / "trees"
        running_after = not any(trees.iterdir())
        warm_seconds = read_file(target / name, handle)
        os.close(handle)
        deadline = time.monotonic() + 600
        while not any(trees.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.2)
        cached_file = next(trees.iterdir()) / name
        drop_caches()
        direct_cold = read_file(cached_file)
        direct_warm = read_file(cached_file)
        results[label] = {
            "cold_gb_s": size / cold / 1e9, "warm_gb_s": size / warm_seconds / 1e9,
            "direct_cold_gb_s": size / direct_cold / 1e9, "direct_warm_gb_s": size / direct_warm / 1e9,
            "registry_line_rate_gb_s": line_rate, "cold_vs_line_rate": size / cold / 1e9 / line_rate,
            "cold_vs_direct": direct_cold / cold, "warm_vs_direct": direct_warm / warm_seconds,
            "pull_still_running_when_read_ended": running_after}
        plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=label, target_path=str(target)))
        plugin.stop()
    with_index, without = results["with_index"], results["without_index"]
    assert isinstance(with_index, dict) and isinstance(without, dict)
    results["index_verification_cost_cold"] = 1 - with_index["cold_gb_s"] / without["cold_gb_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--cases", default="publish,during-pull,full-load")
    parser.add_argument("--shard-mib", type=int, default=384)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lazy-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            model = make_shards(work / "model", 1, int(args.gib * (1 << 30)))
            name = next(p.name for p in model.iterdir() if p.suffix == ".safetensors")
            size = (model / name).stat().st_size
            if "during-pull" in cases:
                results["during_pull"] = during_pull(registry, work, model, name, size)
            if "publish" in cases:
                results["publish"] = publish_case(registry, work, model, name, size)
            if "full-load" in cases:
                shards = make_shards(work / "model-2", 2, args.shard_mib << 20)
                results["full_load"] = full_load(registry, work, shards, args.runs)
        finally:
            registry.stop()
    print(json.dumps(results, indent=2))


def read_all(directory: Path, handles: dict[str, int] | None = None) -> float:
    """Seconds to read every file of ``directory`` sequentially (by name, shards last as loaders do)."""
    start = time.perf_counter()
    for path in sorted(directory.iterdir(), key=lambda p: (p.suffix == ".safetensors", p.name)):
        read_file(path, handles.get(path.name) if handles else None)
    return time.perf_counter() - start


def cold_start(registry: RunningRegistry, work: Path, total: int) -> None:
    prefault(3 * total, work)
    drop_caches()
    warm(registry.root / "data")


def stop(plugin: CsiProcess) -> None:
    """Stop a plugin; kill it if it does not end in time (a download under way can delay its exit)."""
    try:
        plugin.stop()
    except subprocess.TimeoutExpired:
        assert plugin.process is not None
        plugin.process.kill()
        plugin.process.wait()


def lazy_load(registry: RunningRegistry, work: Path, ref: str, total: int, run: str) -> dict[str, float]:
    """Publish lazily and read every file at once; then, once the pull is complete, re-read through the
    same (FUSE) handles and directly from the cache, both warm."""
    cold_start(registry, work, total)
    plugin = running_plugin(work / run)
    target = work / "pods" / run
    target.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    plugin.node.NodePublishVolume(publish_request(run, target, ref, mount="lazy"))
    handles = {p.name: os.open(p, os.O_RDONLY) for p in target.iterdir()}  # for the warm re-read below
    seconds = time.perf_counter() - start + read_all(target)  # each file opened when read, as loaders do
    trees = plugin.root / "trees"
    deadline = time.monotonic() + 600
    while not any(trees.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    tree = next(trees.iterdir())
    read_all(tree)
    direct = min(read_all(tree) for _ in range(3))
    through = min(read_all(target, handles) for _ in range(3))
    for handle in handles.values():
        os.close(handle)
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=run, target_path=str(target)))
    stop(plugin)
    shutil.rmtree(work / run)
    return {"seconds": seconds, "warm_fuse_gb_s": total / through / 1e9, "warm_direct_gb_s": total / direct / 1e9}


def pull_then_read(registry: RunningRegistry, work: Path, ref: str, total: int, run: str) -> float:
    cold_start(registry, work, total)
    plugin = running_plugin(work / run)
    target = work / "pods" / run
    start = time.perf_counter()
    publish_until_done(plugin, publish_request(run, target, ref))
    seconds = time.perf_counter() - start + read_all(target)
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=run, target_path=str(target)))
    stop(plugin)
    shutil.rmtree(work / run)
    return seconds


def lazy_tail(registry: RunningRegistry, work: Path, ref: str, total: int, last: str, run: str) -> float:
    cold_start(registry, work, total)
    plugin = running_plugin(work / run)
    target = work / "pods" / run
    start = time.perf_counter()
    plugin.node.NodePublishVolume(publish_request(run, target, ref, mount="lazy"))
    tail_read(target / last)
    seconds = time.perf_counter() - start
    plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=run, target_path=str(target)))
    stop(plugin)
    shutil.rmtree(work / run)
    return seconds


def full_load(registry: RunningRegistry, work: Path, model: Path, runs: int) -> dict[str, object]:
    total = sum(p.stat().st_size for p in model.iterdir())
    last = max(p.name for p in model.iterdir() if p.suffix == ".safetensors")
    results: dict[str, object] = {"model_bytes": total}
    for label, extra in (("with_index", []), ("without_index", ["--no-chunk-index"])):
        ref = f"{registry.host}/bench/full-{label.replace('_', '-')}:v1"
        subprocess.run([*OCIMODEL, "push", str(model), ref, "--plain-http", *extra], check=True, capture_output=True)
        lazy: list[dict[str, float]] = []
        pulled: list[float] = []
        tails: list[float] = []
        for i in range(runs):
            if i % 2:
                pulled.append(pull_then_read(registry, work, ref, total, f"pull-{label}-{i}"))
            lazy.append(lazy_load(registry, work, ref, total, f"lazy-{label}-{i}"))
            if not i % 2:
                pulled.append(pull_then_read(registry, work, ref, total, f"pull-{label}-{i}"))
            tails.append(lazy_tail(registry, work, ref, total, last, f"tail-{label}-{i}"))
            print(label, lazy[-1], pulled[-1], tails[-1], file=sys.stderr, flush=True)
        median = {key: statistics.median(r[key] for r in lazy) for key in lazy[0]}
        results[label] = {
            "lazy_full_read_seconds": median["seconds"], "pull_then_read_seconds": statistics.median(pulled),
            "ratio": median["seconds"] / statistics.median(pulled),
            "lazy_first_tail_MiB_seconds": statistics.median(tails),
            "warm_fuse_gb_s": median["warm_fuse_gb_s"], "warm_direct_gb_s": median["warm_direct_gb_s"],
            "warm_ratio": median["warm_fuse_gb_s"] / median["warm_direct_gb_s"],
            "raw": {"lazy": lazy, "pull_then_read": pulled, "tail": tails}}
    return results


def publish_case(registry: RunningRegistry, work: Path, model: Path, name: str, size: int) -> dict[str, object]:
    results: dict[str, object] = {}
    ref = f"{registry.host}/bench/lazy:v1"
    subprocess.run([*OCIMODEL, "push", str(model), ref, "--plain-http"], check=True, capture_output=True)
    prefault(3 * size, work)
    drop_caches()
    warm(registry.root / "data")

    lazy = running_plugin(work / "lazy")
    target = work / "pods" / "lazy"
    target.parent.mkdir(exist_ok=True)
    start = time.perf_counter()
    lazy.node.NodePublishVolume(publish_request("lazy", target, ref, mount="lazy"))
    mounted = time.perf_counter() - start
    tail_read(target / name)
    results["lazy_first_tail_MiB_seconds"] = time.perf_counter() - start
    results["lazy_mount_seconds"] = mounted
    early = os.open(target / name, os.O_RDONLY)  # a handle on the FUSE layer itself

    drop_caches()
    warm(registry.root / "data")
    bind = CsiProcess(work / "bind", verbose=False)
    bind_target = work / "pods" / "bind"
    start = time.perf_counter()
    publish_until_done(bind, publish_request("bind", bind_target, ref))
    tail_read(bind_target / name)
    results["bind_first_tail_MiB_seconds"] = time.perf_counter() - start

    blob_dir = lazy.root / "trees"
    deadline = time.monotonic() + 600
    while not any(blob_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    while sum(1 for line in Path("/proc/self/mountinfo").read_text().splitlines()
              if line.split()[4] == str(target)) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    cached_file = next(blob_dir.iterdir()) / name
    rounds: dict[str, list[float]] = {"direct": [], "through_mount": [], "fuse_handle": []}
    for _ in range(2):
        drop_caches()
        rounds["direct"].append(size / read_file(cached_file) / 1e9)
        drop_caches()
        rounds["through_mount"].append(size / read_file(target / name) / 1e9)
        drop_caches()
        rounds["fuse_handle"].append(size / read_file(target / name, early) / 1e9)
    os.close(early)
    for key, values in rounds.items():
        results[f"complete_read_gb_s_{key}"] = max(values)
    results["through_mount_vs_direct"] = max(rounds["through_mount"]) / max(rounds["direct"])
    results["fuse_handle_vs_direct"] = max(rounds["fuse_handle"]) / max(rounds["direct"])
    results["file_bytes"] = size
    for process, volume, path in ((lazy, "lazy", target), (bind, "bind", bind_target)):
        process.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume,
                                                                            target_path=str(path)))
        process.stop()
    return results


if __name__ == "__main__":
    main()
