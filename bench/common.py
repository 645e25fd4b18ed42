"""Shared helpers of the benchmarks: a local registry, sample models, cache dropping, timing children."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.csi import CsiProcess  # noqa: E402
from tests.helpers.registry import RunningRegistry, start_registry  # noqa: E402

OCIMODEL = [sys.executable, "-m", "ocimodel.cli"]

__all__ = ["OCIMODEL", "Run", "RunningRegistry", "drop_caches", "make_shards", "measure", "prefault",
           "running_plugin", "start_registry", "timed", "warm"]


def running_plugin(workdir: Path) -> CsiProcess:
    """The plugin as it runs on a node: started beforehand, so its spare lazy-mount server waits for a job."""
    plugin = CsiProcess(workdir, verbose=False)
    deadline = time.monotonic() + 60
    while not any((plugin.root / "csi" / "spare").glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return plugin


def drop_caches() -> bool:
    """Write back and drop the page cache (root only); False when not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def prefault(size: int, directory: Path) -> None:
    """Write and delete a file of ``size`` bytes, so that the free memory the next run's page cache takes
    has been touched (see bench/pull.py)."""
    path = directory / ".prefault"
    block = bytes(4 << 20)
    with open(path, "wb") as out:
        for _ in range(-(-size // len(block))):
            out.write(block)
    path.unlink()


def warm(path: Path) -> None:
    """Read every file under ``path`` once so the registry serves from page cache."""
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                while handle.read(8 << 20):
                    pass


def make_shards(directory: Path, shards: int, shard_bytes: int) -> Path:
    """A model directory of random shards plus a config."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 20)
    for i in range(shards):
        with open(directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors", "wb") as out:
            for j in range(shard_bytes >> 20):
                out.write(block[j % 256:] + block[: j % 256] if j else os.urandom(1 << 20))
    (directory / "config.json").write_text('{"model_type": "bench"}')
    return directory


def _hwm(pid: int) -> int:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Run:
    """What a child process took: wall seconds, peak RSS (bytes), user and system CPU seconds."""

    seconds: float
    peak_rss: int
    user: float
    sys: float


def measure(cmd: list[str], **kwargs: object) -> Run:
    """Run ``cmd`` and measure it: its peak RSS is VmHWM polled every 20 ms (the ru_maxrss of wait4 would
    include the forking parent's memory), its CPU the rusage of wait4."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)  # type: ignore[call-overload]
    peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _hwm(proc.pid))
        time.sleep(0.02)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return Run(elapsed, peak, usage.ru_utime, usage.ru_stime)


def timed(cmd: list[str], **kwargs: object) -> tuple[float, int]:
    """Run ``cmd``; return wall seconds and its peak RSS in bytes (see :func:`measure`)."""
    run = measure(cmd, **kwargs)
    return run.seconds, run.peak_rss
