"""What a new operator meets first (issue 21): every option of every command explains itself and names its
default; a service whose address is taken says so in one line, naming the option, and exits."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ocimodel.cli import build_parser

FLAGS = (argparse._StoreTrueAction, argparse._CountAction, argparse._VersionAction)


def commands(parser: argparse.ArgumentParser, path: str = "ocimodel") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every parser under ``parser``, with its command line."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{path} {name}")


def test_every_option_has_help_naming_its_default() -> None:
    """Every argument has help; every option that is not a flag or required says its default: a value with
    %(default)s, an empty one (taken from the environment, the settings file, or off) in words. Any that does
    not fails here by name."""
    missing, hidden = [], []
    seen = 0
    for path, parser in commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            seen += 1
            name = f"{path} {'/'.join(action.option_strings) or action.dest}"
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(name)
            elif action.option_strings and not action.required and not isinstance(action, FLAGS) and \
                    ("%(default)" if action.default else "default") not in action.help:
                hidden.append(name)
    assert seen > 100
    assert missing == [], f"arguments without help: {missing}"
    assert hidden == [], f"options whose help does not give their default: {hidden}"


@pytest.mark.parametrize("command", [path.split()[1:] for path, _ in commands(build_parser())],
                         ids=lambda c: " ".join(c) or "ocimodel")
def test_help_renders(command: list[str]) -> None:
    """``--help`` of every command renders (a stray % in a help text would fail only here)."""
    proc = subprocess.run([sys.executable, "-m", "ocimodel.cli", *command, "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage: ocimodel" in proc.stdout


def test_agent_help_explains_the_issue_options() -> None:
    text = subprocess.run([sys.executable, "-m", "ocimodel.cli", "agent", "--help"], capture_output=True, text=True,
                          timeout=60, check=True).stdout
    assert "(default: 0.0.0.0:9810)" in " ".join(text.split())
    assert "(default: 30.0)" in " ".join(text.split())


# -- addresses already taken --------------------------------------------------------------------------------


def run_service(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``ocimodel ARGS`` to its end in a session of its own; afterwards nothing of it may be running."""
    proc = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _session(p) == proc.pid]
    assert left == [], f"processes of the service still running: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _session(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


@pytest.fixture
def taken_port() -> Iterator[str]:
    """A loopback port this test listens on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"127.0.0.1:{server.getsockname()[1]}"


def assert_one_line(proc: subprocess.CompletedProcess[str], line: str) -> None:
    assert proc.returncode != 0
    assert proc.stderr.splitlines() == [line], proc.stderr


def test_agent_metrics_port_taken(tmp_path: Path, taken_port: str) -> None:
    proc = run_service("agent", "--kubeconfig", "none", "--root", str(tmp_path / "root"),
                       "--metrics-address", taken_port)
    assert_one_line(proc, f"ocimodel: --metrics-address {taken_port}: address already in use")


def test_csi_metrics_port_taken(tmp_path: Path, taken_port: str) -> None:
    proc = run_service("csi", "--kubeconfig", "none", "--root", str(tmp_path / "root"),
                       "--endpoint", f"unix://{tmp_path / 'csi.sock'}", "--metrics-address", taken_port)
    assert_one_line(proc, f"ocimodel: --metrics-address {taken_port}: address already in use")


def test_csi_tcp_endpoint_taken(tmp_path: Path, taken_port: str) -> None:
    proc = run_service("csi", "--kubeconfig", "none", "--root", str(tmp_path / "root"),
                       "--endpoint", f"tcp://{taken_port}")
    assert_one_line(proc, f"ocimodel: --endpoint tcp://{taken_port}: address already in use")


def test_csi_socket_served_by_another_process(tmp_path: Path) -> None:
    """A socket some process listens on (another plugin) is left alone: the new plugin refuses to start."""
    path = tmp_path / "csi.sock"
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(str(path))
        other.listen()
        proc = run_service("csi", "--kubeconfig", "none", "--root", str(tmp_path / "root"),
                           "--endpoint", f"unix://{path}")
        assert_one_line(proc, f"ocimodel: --endpoint unix://{path}: address already in use")
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))  # still the other process's


def test_csi_endpoint_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "csi.sock"
    path.write_text("not a socket")
    proc = run_service("csi", "--kubeconfig", "none", "--root", str(tmp_path / "root"), "--endpoint", f"unix://{path}")
    assert_one_line(proc, f"ocimodel: --endpoint unix://{path}: exists and is not a socket")
    assert path.read_text() == "not a socket"


def test_csi_socket_of_a_previous_run_is_replaced(tmp_path: Path) -> None:
    """A socket file nothing listens on (the plugin was killed) is removed and served again."""
    from tests.helpers.csi import CsiProcess
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "csi-all.sock"))
    stale.close()
    plugin = CsiProcess(tmp_path)
    assert plugin.stop() == 0
