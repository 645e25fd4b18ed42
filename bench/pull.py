"""Cold pull throughput: ``ocimodel pull`` vs curl (blobs to disk) vs ``skopeo copy`` to an oci: layout,
on the same multi-shard model from a local registry, in one run. Also the cached second pull.

Usage: python bench/pull.py [--gib 2] [--shards 4]
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

from common import OCIMODEL, drop_caches, make_shards, start_registry, timed, warm


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    shard_bytes = int(args.gib * (1 << 30)) // args.shards // (1 << 20) * (1 << 20)
    with tempfile.TemporaryDirectory(prefix="bench-pull-", dir=args.workdir) as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            model = make_shards(work / "model", args.shards, shard_bytes)
            ref = f"{registry.host}/bench/model:v1"
            subprocess.run([*OCIMODEL, "push", str(model), ref, "--plain-http"], check=True, capture_output=True)
            shutil.rmtree(model)
            manifest = json.loads(subprocess.run(
                ["curl", "-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json",
                 f"http://{ref.replace(':v1', '').replace('/bench', '/v2/bench')}/manifests/v1"],
                check=True, capture_output=True).stdout)
            blobs = [layer["digest"] for layer in manifest["layers"]]
            total = sum(layer["size"] for layer in manifest["layers"])
            results: dict[str, dict[str, float]] = {}

            def prepare() -> None:
                drop_caches()
                warm(registry.root / "data")

            # ocimodel pull, cold cache
            prepare()
            root = work / "cache"
            seconds, rss = timed([*OCIMODEL, "pull", ref, "--plain-http", "--root", str(root)])
            results["ocimodel"] = {"seconds": seconds, "mb_s": total / seconds / 1e6, "peak_rss_mb": rss / 1e6}

            # cached second pull: CLI process and the in-process call
            seconds, _ = timed([*OCIMODEL, "pull", ref, "--plain-http", "--root", str(root)])
            results["ocimodel_cached_cli"] = {"seconds": seconds}
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from modelcache.settings import Settings
            settings = Settings(root=root)
            settings.hosts.plain_http = True
            cache = settings.cache()
            start = time.perf_counter()
            cache.pull(ref)
            results["ocimodel_cached_call"] = {"seconds": time.perf_counter() - start}

            # curl: the same blobs, one after another, to disk
            prepare()
            out = work / "curl"
            out.mkdir()
            cmd = ["curl", "-sf"]
            for digest in blobs:
                cmd += ["-o", str(out / digest.replace(":", "-")), f"http://{registry.host}/v2/bench/model/blobs/{digest}"]
            seconds, rss = timed(cmd)
            sync_start = time.perf_counter()
            subprocess.run(["sync"], check=True)
            synced = seconds + time.perf_counter() - sync_start
            results["curl"] = {"seconds": seconds, "mb_s": total / seconds / 1e6, "peak_rss_mb": rss / 1e6,
                               "seconds_with_sync": synced, "mb_s_with_sync": total / synced / 1e6}
            shutil.rmtree(out)

            # skopeo copy to an oci: layout
            if shutil.which("skopeo"):
                prepare()
                seconds, rss = timed(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}",
                                      f"oci:{work / 'skopeo'}:v1"])
                results["skopeo"] = {"seconds": seconds, "mb_s": total / seconds / 1e6, "peak_rss_mb": rss / 1e6}
        finally:
            registry.stop()
    o, c = results["ocimodel"], results["curl"]
    summary = {
        "bytes": total, "shards": args.shards, "results": results,
        "ratio_vs_curl": o["mb_s"] / c["mb_s"],
        "ratio_vs_curl_with_sync": o["mb_s"] / c["mb_s_with_sync"],
        "ratio_vs_skopeo": o["mb_s"] / results["skopeo"]["mb_s"] if "skopeo" in results else None,
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
