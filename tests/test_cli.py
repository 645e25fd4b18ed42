"""The ``ocimodel`` command line, run as a real process: push, pull, cache ls/du/rm/gc, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelcache.registry import mediatypes as mt
from tests.helpers.oci import Fixtures
from tests.helpers.registry import RunningRegistry


def ocimodel(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "ocimodel.cli", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def make_model(directory: Path, shared: bytes) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(shared)
    (directory / "config.json").write_text('{"model_type": "test"}')
    (directory / "tokenizer").mkdir()
    (directory / "tokenizer" / "vocab.txt").write_text(str(directory))
    return directory


def test_push_pull_ls_du_rm_gc(registry: RunningRegistry, tmp_path: Path) -> None:
    shared = os.urandom(500_000)
    root = str(tmp_path / "cache")
    for name in ("one", "two"):
        ocimodel("push", str(make_model(tmp_path / name, shared)), f"{registry.host}/cli/{name}:v1", "--plain-http")
    pulled = [json.loads(ocimodel("pull", f"{registry.host}/cli/{n}:v1", "--plain-http", "--root", root, "--json",
                                  "--list-files").stdout) for n in ("one", "two")]
    assert pulled[0]["file_list"] == ["config.json", "model.safetensors", "tokenizer/vocab.txt"]
    assert pulled[0]["layout"] == "modelpack" and not pulled[0]["cached"]
    assert pulled[1]["downloaded_bytes"] < 1000
    listing = json.loads(ocimodel("cache", "ls", "--root", root, "--json").stdout)
    assert {row["key"] for row in listing} == {p["path"].rsplit("/", 1)[-1] for p in pulled}
    du = json.loads(ocimodel("cache", "du", "--root", root, "--json").stdout)
    assert du["models"] == 2 and du["shared_bytes"] >= len(shared) - 65536
    removed = json.loads(ocimodel("cache", "rm", pulled[0]["digest"], "--root", root, "--json").stdout)
    assert removed["removed"] == [pulled[0]["path"].rsplit("/", 1)[-1]]
    assert removed["freed_bytes"] < len(shared)  # the shared shard stays for model two
    assert not Path(pulled[0]["path"]).exists() and Path(pulled[1]["path"], "model.safetensors").read_bytes() == shared
    ocimodel("cache", "rm", f"{registry.host}/cli/two:v1@{pulled[1]['digest']}", "--root", root)
    gc = json.loads(ocimodel("cache", "gc", "--dry-run", "--root", root, "--json").stdout)
    assert gc["blobs"] == [] and gc["freed_bytes"] == 0
    assert list((tmp_path / "cache" / "blobs" / "sha256").iterdir()) == []


def test_gc_removes_orphans_and_dry_run_keeps_them(registry: RunningRegistry, tmp_path: Path) -> None:
    root = tmp_path / "cache"
    ocimodel("push", str(make_model(tmp_path / "m", b"w" * 1000)), f"{registry.host}/cli/gc:v1", "--plain-http")
    result = json.loads(ocimodel("pull", f"{registry.host}/cli/gc:v1", "--plain-http", "--root", str(root),
                                 "--json").stdout)
    (root / "models" / f"{Path(result['path']).name}.json").unlink()
    dry = json.loads(ocimodel("cache", "gc", "--dry-run", "--root", str(root), "--json").stdout)
    assert len(dry["blobs"]) == 5 and Path(result["path"]).exists()
    ocimodel("cache", "gc", "--root", str(root))
    assert not Path(result["path"]).exists() and list((root / "blobs" / "sha256").iterdir()) == []


def test_exit_codes_and_messages(registry: RunningRegistry, tmp_path: Path) -> None:
    bad = ocimodel("pull", "NOT/valid", "--root", str(tmp_path), check=False)
    assert bad.returncode == 2 and "invalid argument" in bad.stderr and "Traceback" not in bad.stderr
    missing = ocimodel("pull", f"{registry.host}/no/such:v1", "--plain-http", "--root", str(tmp_path), check=False)
    assert missing.returncode == 3 and "not found" in missing.stderr
    down = ocimodel("pull", "127.0.0.1:9/x/y:v1", "--plain-http", "--root", str(tmp_path), check=False)
    assert down.returncode == 5 and "unreachable" in down.stderr
    rm = ocimodel("cache", "rm", "nothing", "--root", str(tmp_path), check=False)
    assert rm.returncode == 3


def test_a_full_disk_exits_7(fixtures: Fixtures, tmp_path: Path) -> None:
    """A download that runs into a full cache filesystem (a 64 MiB tmpfs, most of it taken) exits 7."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    fixtures.raw_model("cli/full:v1", {"weights.safetensors": os.urandom(40 << 20)})
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(small)], check=True)
    try:
        (small / "filler").write_bytes(b"\0" * (40 << 20))  # fits the declared size, not the free space
        out = ocimodel("pull", fixtures.ref("cli/full:v1"), "--plain-http", "--root", str(small / "cache"),
                       check=False)
        assert out.returncode == 7, out.stderr
        assert "no space left" in out.stderr.lower(), out.stderr
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_an_unsupported_artifact_exits_8(fixtures: Fixtures, tmp_path: Path) -> None:
    """A raw model layer without a file path annotation cannot become a file: exit 8, no tree."""
    layer = fixtures.layer("cli/odd:v1", b"weights", mt.model_layer_type("weight", mt.Compression.RAW))
    fixtures.manifest("cli/odd:v1", [layer])
    root = tmp_path / "cache"
    out = ocimodel("pull", fixtures.ref("cli/odd:v1"), "--plain-http", "--root", str(root), check=False)
    assert out.returncode == 8, out.stderr
    assert not (root / "trees").exists() or not list((root / "trees").iterdir())
