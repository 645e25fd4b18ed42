"""Page-cache warming: ``ocimodel warm`` vs ``vmtouch -t`` on the same cold files, and the time to read the
model sequentially cold vs warmed.

Usage (root, for drop_caches): python bench/warm.py [--gib 4] [--files 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import OCIMODEL, drop_caches, make_shards, timed


def read_all(directory: Path) -> float:
    """Seconds to read every file sequentially into one reused buffer."""
    buffer = bytearray(8 << 20)
    start = time.perf_counter()
    for path in sorted(directory.iterdir()):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=4.0)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not drop_caches():
        sys.exit("needs root to drop the page cache")
    with tempfile.TemporaryDirectory(prefix="bench-warm-", dir="/var/tmp") as tmp:
        model = make_shards(Path(tmp) / "model", args.files, int(args.gib * (1 << 30)) // args.files)
        total = sum(p.stat().st_size for p in model.iterdir())
        ours, theirs = [], []
        for _ in range(args.rounds):
            drop_caches()
            ours.append(timed([*OCIMODEL, "warm", str(model), "--share", "0.9"])[0])
            drop_caches()
            theirs.append(timed(["vmtouch", "-tq", str(model)])[0])
        drop_caches()
        cold = read_all(model)
        drop_caches()
        timed([*OCIMODEL, "warm", str(model), "--share", "0.9"])
        warm = read_all(model)
        shutil.rmtree(model)
    best_ours, best_theirs = min(ours), min(theirs)
    print(json.dumps({
        "bytes": total,
        "ocimodel_warm_seconds": ours, "vmtouch_t_seconds": theirs,
        "warm_ratio_to_vmtouch": best_ours / best_theirs,
        "read_cold_seconds": cold, "read_warm_seconds": warm, "warm_read_speedup": cold / warm,
        "ocimodel_warm_gb_s": total / best_ours / 1e9,
    }, indent=2))


if __name__ == "__main__":
    main()
