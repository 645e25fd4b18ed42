"""CPU priority of a spare lazy-mount server: the lowest while it waits for a job, its plugin's once it has
one. Kept apart from lazyfs.py so that a spare lowers its priority before its heavy imports."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
SPARE_NICE = 19
CAP_SYS_NICE = 23


def can_raise_priority() -> bool:
    """True when this process may raise its priority again (CAP_SYS_NICE in its effective set)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_NICE & 1)
    return False


def wait_as_spare() -> None:
    """Lower this process to the lowest priority while it waits, if it can raise it again later."""
    if can_raise_priority():
        os.setpriority(os.PRIO_PROCESS, 0, SPARE_NICE)


def take_priority(nice: int) -> None:
    """Set every thread of this process to ``nice`` (the plugin's priority)."""
    for task in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(task), nice)
        except OSError as exc:
            log.warning("could not take the plugin's CPU priority (%d): %s", nice, exc)
