"""How soon a lazy mount shows the tree of a model of many small files: 2,000 files of 4 KiB and one 64 MiB
shard, pushed as tar layers one per file (2,001 layers: ``--layer-format tar --pack-small never``), each
announcing its file in its annotations as modctl and ``ocimodel push`` write them; the same layers without
those annotations (as other producers write them: every layer's headers are read); and packed
(``--layer-format tar``: the small files in one tar layer, 2 layers). For each, best of ``--runs`` from a
cold page cache:

- ``publish_seconds``: a lazy NodePublishVolume through the real plugin until it returns and the mount
  lists every file (what a pod waits for);
- ``build_seconds``: the lazy tree alone, built in this process (LazyModel.build: the headers of the tar
  layers read from the registry), without the plugin's start-up.

Usage (root, /dev/fuse): python bench/lazytree.py [--runs 3] [--files 2000]
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
from pathlib import Path
from typing import Any

from common import OCIMODEL, RunningRegistry, drop_caches, start_registry, warm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from csi_driver.proto import csi_pb2  # noqa: E402
from modelcache.registry.client import RegistryClient  # noqa: E402
from modelcache.registry.hosts import HostsConfig  # noqa: E402
from modelcache.registry.reference import parse_reference  # noqa: E402
from modelcache.registry.transport import Transport  # noqa: E402
from tests.helpers.csi import CsiProcess, publish_request  # noqa: E402
from tests.helpers.lazymodels import lazy_model, without_announcements  # noqa: E402

SHARD_BYTES = 64 << 20


def cold(registry: RunningRegistry) -> None:
    drop_caches()
    warm(registry.root / "data")


def publish(registry: RunningRegistry, work: Path, ref: str, files: int, run: str) -> float:
    """Seconds from a lazy publish to a listing of every file, through a plugin started beforehand."""
    cold(registry)
    plugin = CsiProcess(work / run, verbose=False)
    target = work / "pods" / run
    target.parent.mkdir(exist_ok=True)
    try:
        start = time.perf_counter()
        plugin.node.NodePublishVolume(publish_request(run, target, ref, mount="lazy"))
        listed = sum(len(names) for _, _, names in os.walk(target))
        seconds = time.perf_counter() - start
        assert listed == files, f"the mount lists {listed} files, not {files}"
        plugin.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=run, target_path=str(target)))
    finally:
        try:
            plugin.stop()
        except subprocess.TimeoutExpired:  # a download under way can delay its exit
            assert plugin.process is not None
            plugin.process.kill()
    shutil.rmtree(work / run)
    return seconds


def client() -> RegistryClient:
    return RegistryClient(Transport(HostsConfig(plain_http=True)))


def build(registry: RunningRegistry, work: Path, ref: str, run: str) -> float:
    """Seconds to build the lazy tree in this process, from a cold page cache and an empty cache root."""
    cold(registry)
    model = lazy_model(work / run, client(), ref)
    start = time.perf_counter()
    model.build()
    seconds = time.perf_counter() - start
    model.close()
    shutil.rmtree(work / run)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3, help="runs of each measure (best reported)")
    parser.add_argument("--files", type=int, default=2000, help="small files of 4 KiB besides the 64 MiB shard")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    summary: dict[str, Any] = {"files": args.files + 1, "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench-lazytree-", dir=args.workdir) as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            model = work / "model"
            model.mkdir()
            for i in range(args.files):
                (model / f"file-{i:05d}.json").write_bytes(os.urandom(4096))
            with open(model / "model.safetensors", "wb") as out:
                for _ in range(SHARD_BYTES >> 20):
                    out.write(os.urandom(1 << 20))
            for label, extra in (("one_tar_layer_per_file", ["--pack-small", "never"]),
                                 ("one_tar_layer_per_file_unannotated", ["--pack-small", "never"]), ("packed", [])):
                ref = f"{registry.host}/bench/{label.replace('_', '-')}:v1"
                subprocess.run([*OCIMODEL, "push", str(model), ref, "--plain-http", "--layer-format", "tar", *extra],
                               check=True, capture_output=True)
                if label.endswith("_unannotated"):
                    without_announcements(registry.host, ref.split("/", 1)[1])
                runs = range(args.runs)
                summary[label] = {
                    "layers": len(client().resolve(parse_reference(ref)).manifest.layers),
                    "publish_seconds": min(publish(registry, work, ref, args.files + 1, f"{label}-{i}") for i in runs),
                    "build_seconds": min(build(registry, work, ref, f"build-{label}-{i}") for i in runs)}
        finally:
            registry.stop()
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
