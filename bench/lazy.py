"""Lazy mounts: time from the publish call to the first 1 MiB read at the end of a large file (lazy vs a
full pull then bind mount), and sequential reads once the model is complete (through the mount, through
a FUSE handle opened before completion, and directly from the cache).

Usage (root, /dev/fuse): python bench/lazy.py [--gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import OCIMODEL, drop_caches, make_shards, start_registry, warm

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    args = parser.parse_args()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lazy-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            model = make_shards(work / "model", 1, int(args.gib * (1 << 30)))
            ref = f"{registry.host}/bench/lazy:v1"
            subprocess.run([*OCIMODEL, "push", str(model), ref, "--plain-http"], check=True, capture_output=True)
            name = next(p.name for p in model.iterdir() if p.suffix == ".safetensors")
            size = (model / name).stat().st_size
            for p in model.iterdir():
                p.unlink()
            drop_caches()
            warm(registry.root / "data")

            lazy = CsiProcess(work / "lazy", verbose=False)
            target = work / "pods" / "lazy"
            target.parent.mkdir()
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
        finally:
            registry.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
