"""Small real filesystems to fill up (tmpfs mounts under a test's directory), unmounted afterwards with
everything mounted beneath them."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path


def small_filesystems(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """For a fixture: yields ``make(name, size)``, a fresh tmpfs of ``size`` (``mount -o size=``) at
    ``tmp_path/name``; on the way out unmounts every mount under ``tmp_path``, then the tmpfs mounts."""
    mounted: list[Path] = []

    def make(name: str, size: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
        mounted.append(path)
        return path

    yield make
    for path in mounted:
        for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
            point = line.split()[4]
            if point.startswith(str(tmp_path)) and point != str(path):
                subprocess.run(["umount", "-l", point], check=False)
        subprocess.run(["umount", "-l", str(path)], check=False)
