"""Mount namespaces laid out as on a node: the test process plays the host; the plugin runs in its own
namespace whose view of the pods and cache directories is shared with the host (``mountPropagation:
Bidirectional``); a pod is a process in a namespace of its own, either holding a private copy of the
volume as it was when the container started (kubelet's default) or following the host (HostToContainer)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# unshare(1) makes every mount private unless told otherwise; "unchanged" keeps the shared peer groups
PLUGIN_NAMESPACE = ("unshare", "--mount", "--propagation", "unchanged", "--")


def share(directory: Path) -> None:
    """Make ``directory`` a shared mount point in this namespace (as kubelet's and the cache's hostPaths are)."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    subprocess.run(["mount", "--make-rshared", str(directory)], check=True)


def unmount_tree(directory: Path) -> None:
    """Lazily unmount everything at and below ``directory`` in this namespace."""
    subprocess.run(["umount", "--recursive", "--lazy", str(directory)], check=False, capture_output=True)


class PodView:
    """A 'container' that reads the volume at ``target`` from its own mount namespace."""

    def __init__(self, target: Path, propagation: str = "private") -> None:
        self.target = target
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", propagation, "--", sys.executable, "-m", "tests.helpers.podview",
             str(target)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.ask_raw() == "READY"

    def ask_raw(self, line: str | None = None) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        if line is not None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def sha256(self, rel: str) -> str:
        """The sha256 of a file as the pod reads it, or ``ERR <errno name>``."""
        return self.ask_raw(f"hash {rel}")

    def create(self, rel: str) -> str:
        """Try to create a file: ``WRITTEN`` or ``ERR <errno name>``."""
        return self.ask_raw(f"create {rel}")

    def append(self, rel: str) -> str:
        """Try to append to a file: ``WRITTEN`` or ``ERR <errno name>``."""
        return self.ask_raw(f"append {rel}")

    def listing(self, rel: str = "") -> list[str] | str:
        answer = self.ask_raw(f"ls {rel}")
        return answer if answer.startswith("ERR") else list(json.loads(answer))

    def options(self) -> set[str]:
        """Per-mount options of the volume in the pod's namespace."""
        return set(self.ask_raw("options").split(","))

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)
