"""Looking at other processes through /proc without racing them: a process can end, and be reaped, between
any two looks (even between opening one of its files and reading it), and a child just forked shows its
parent's command line until it execs."""

from __future__ import annotations

from pathlib import Path


def state(pid: int) -> str | None:
    """The state letter of ``pid`` (R, S, D, Z, ...), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def alive(pid: int) -> bool:
    """True while ``pid`` runs: neither reaped nor a zombie waiting to be."""
    return state(pid) not in (None, "Z", "X")


def children(pid: int) -> list[int]:
    """The children of every thread of ``pid`` ([] once it is gone)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return []
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended while we looked
            continue
    return found


def command_line(pid: int) -> bytes | None:
    """The NUL-separated command line of ``pid``, or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None


def children_running(pid: int, program: bytes) -> list[int]:
    """The children of ``pid`` that have exec'd a command line containing ``program`` (a child between fork
    and exec still shows the parent's and is not counted until it has)."""
    return [child for child in children(pid) if program in (command_line(child) or b"")]


def open_files(pid: int) -> set[str]:
    """What the descriptors of ``pid`` point to now (a descriptor closed while we look is skipped)."""
    found: set[str] = set()
    try:
        descriptors = list(Path(f"/proc/{pid}/fd").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return found
    for descriptor in descriptors:
        try:
            found.add(str(descriptor.readlink()))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found
