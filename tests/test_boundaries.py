"""The core stays free of grpc, kubernetes, pyfuse3 and trio; the CSI driver and the agent never import each other."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed in this environment")
def test_import_contracts_hold() -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_core_import_does_not_load_front_end_libraries() -> None:
    code = ("import sys, modelcache.cache, modelcache.assemble.pull, modelcache.upkeep.gc, modelcache.settings, "
            "modelcache.push, modelcache.mounts;"
            "bad = [m for m in ('grpc', 'kubernetes', 'pyfuse3', 'trio') if m in sys.modules]; print(bad)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
