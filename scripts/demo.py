"""The embedded default run: a local registry on loopback, a generated sample model pushed, pulled and mounted."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers.registry import start_registry  # noqa: E402

OCIMODEL = [sys.executable, "-m", "ocimodel.cli"]


def run(*args: str) -> str:
    print("$ ocimodel " + " ".join(args), flush=True)
    proc = subprocess.run([*OCIMODEL, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"ocimodel {args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def safetensors(path: Path, tensors: dict[str, int]) -> None:
    """Write a valid safetensors file of float32 tensors with random contents."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, count in tensors.items():
        header[name] = {"dtype": "F32", "shape": [count], "data_offsets": [offset, offset + 4 * count]}
        offset += 4 * count
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.write(os.urandom(offset))


def make_models(base: Path) -> tuple[Path, Path]:
    base.mkdir(parents=True)
    shared = base / "shared.safetensors"
    safetensors(shared, {"embed.weight": 2_000_000, "lm_head.weight": 1_000_000})
    models = []
    for name, layers in (("tiny-chat", 3), ("tiny-code", 5)):
        directory = base / name
        directory.mkdir()
        os.link(shared, directory / "model-00001-of-00002.safetensors")
        safetensors(directory / "model-00002-of-00002.safetensors", {f"layer.{i}": 250_000 for i in range(layers)})
        (directory / "config.json").write_text(json.dumps({"model_type": "demo", "num_layers": layers}))
        (directory / "README.md").write_text(f"# {name}\nA generated demo model.\n")
        models.append(directory)
    return models[0], models[1]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="ocimodel-demo-") as tmp:
        work = Path(tmp)
        registry = start_registry(work / "registry")
        try:
            print(f"local registry on {registry.host}")
            chat, code = make_models(work / "src")
            refs = [f"{registry.host}/demo/{m.name}:v1" for m in (chat, code)]
            for model, ref in zip((chat, code), refs, strict=True):
                print(run("push", str(model), ref, "--plain-http").strip())
            root = str(work / "cache")
            for ref in refs:
                result = json.loads(run("pull", ref, "--plain-http", "--root", root, "--json", "--list-files"))
                print(f"  digest  {result['digest']}\n  path    {result['path']}\n"
                      f"  files   {', '.join(result['file_list'])}\n"
                      f"  bytes   {result['total_bytes']:,} in model, {result['downloaded_bytes']:,} downloaded "
                      f"in {result['seconds']:.2f} s")
            again = json.loads(run("pull", refs[0], "--plain-http", "--root", root, "--json"))
            print(f"  second pull: cached={again['cached']} in {again['seconds'] * 1000:.1f} ms")
            print(run("cache", "du", "--root", root).strip())
            demo_mount(refs[0], root, work)
            lazy_model = work / "src" / "tiny-lazy"
            lazy_model.mkdir()
            safetensors(lazy_model / "model.safetensors", {"w": 4_000_000})
            lazy_ref = f"{registry.host}/demo/tiny-lazy:v1"
            print(run("push", str(lazy_model), lazy_ref, "--plain-http").strip())
            demo_lazy(lazy_ref, root, work, lazy_model / "model.safetensors")
        finally:
            registry.stop()


def demo_mount(ref: str, root: str, work: Path) -> None:
    """Mount the model read-only through the CSI node code path (root only) and read from it."""
    if os.geteuid() != 0:
        print("(not root: skipping the mount step)")
        return
    if "mount" not in subprocess.run([*OCIMODEL, "--help"], capture_output=True, text=True).stdout:
        return
    target = work / "mnt"
    run("mount", ref, str(target), "--plain-http", "--root", root)
    try:
        files = sorted(p.name for p in target.iterdir())
        print(f"  mounted at {target}: {', '.join(files)}")
        try:
            (target / "config.json").write_text("{}")
            print("  ERROR: the mount was writable")
        except OSError as exc:
            print(f"  writing to the mount fails as it should: {exc.strerror}")
    finally:
        run("umount", str(target), "--root", root)


def demo_lazy(ref: str, root: str, work: Path, source: Path) -> None:
    """Mount a model that is not cached yet through FUSE and read its tail at once (root and /dev/fuse only)."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        print("(no root or /dev/fuse: skipping the lazy mount step)")
        return
    target = work / "lazy"
    run("mount", "--lazy", ref, str(target), "--plain-http", "--root", root)
    try:
        with open(target / "model.safetensors", "rb") as mounted, open(source, "rb") as original:
            mounted.seek(-(1 << 20), os.SEEK_END)
            original.seek(-(1 << 20), os.SEEK_END)
            same = mounted.read() == original.read()
        print(f"  lazy mount at {target}: mounted before the pull, last MiB of model.safetensors read through it; "
              f"identical to the source: {same}")
    finally:
        run("umount", str(target), "--root", root)


if __name__ == "__main__":
    main()
