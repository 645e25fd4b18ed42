"""Page-cache tools on real files and the real page cache, compared with Debian's vmtouch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modelcache import pagecache
from tests.conftest import needs_root

pytestmark = needs_root
needs_vmtouch = pytest.mark.skipif(shutil.which("vmtouch") is None, reason="vmtouch is not installed")


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    for i, size in enumerate((24 << 20, 8 << 20, 12345)):
        (directory / f"part-{i}.bin").write_bytes(os.urandom(size))
    os.sync()
    pagecache.evict([directory])
    return directory


def vmtouch_resident(path: Path) -> tuple[int, int]:
    out = subprocess.run(["vmtouch", str(path)], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Resident Pages:\s+(\d+)/(\d+)", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


@needs_vmtouch
def test_evict_then_warm_agrees_with_vmtouch(model_dir: Path) -> None:
    assert pagecache.report([model_dir]).resident_pages == vmtouch_resident(model_dir)[0] == 0
    report = pagecache.warm([model_dir])
    assert report.resident_bytes == report.total_bytes == (24 << 20) + (8 << 20) + 12345
    assert vmtouch_resident(model_dir) == (report.pages, report.pages)
    assert pagecache.evict([model_dir]).resident_bytes == 0
    assert vmtouch_resident(model_dir)[0] == 0


@needs_vmtouch
def test_partial_residency_matches_vmtouch_page_for_page(model_dir: Path) -> None:
    with open(model_dir / "part-0.bin", "rb") as handle:
        handle.seek(4 << 20)
        handle.read(3 << 20)
    ours = pagecache.report([model_dir])
    theirs = vmtouch_resident(model_dir)
    assert 0 < ours.resident_pages < ours.pages
    assert (ours.resident_pages, ours.pages) == theirs


def test_memory_share_bounds_a_warm(model_dir: Path) -> None:
    report = pagecache.warm([model_dir], memory_share=1e-12)
    assert report.skipped_bytes == report.total_bytes
    assert "exceed" in report.message and report.resident_bytes == 0


def test_lock_holds_pages_in_memory(model_dir: Path) -> None:
    def locked_kib() -> int:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmLck:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    before = locked_kib()
    locked = pagecache.LockedFiles([model_dir / "part-1.bin"])
    try:
        assert locked.bytes == 8 << 20
        assert locked_kib() - before == 8 << 10
        assert pagecache.report([model_dir / "part-1.bin"]).resident_bytes == 8 << 20
    finally:
        locked.release()
    assert locked_kib() == before


def test_warm_cli_json(model_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "ocimodel.cli", "warm", str(model_dir), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["resident_bytes"] >= 0.99 * data["total_bytes"] and len(data["per_file"]) == 3  # reclaim may race
    evicted = subprocess.run([sys.executable, "-m", "ocimodel.cli", "warm", str(model_dir), "--evict", "--json"],
                             capture_output=True, text=True, timeout=60)
    assert json.loads(evicted.stdout)["resident_bytes"] == 0
