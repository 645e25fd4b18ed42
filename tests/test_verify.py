"""``ocimodel cache verify [--repair]`` and the agent's scheduled verification, on real files changed on
disk the way bit rot or tampering would change them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import requests

from modelcache.digest import Digest
from tests.conftest import needs_root
from tests.helpers.fakekube import write_kubeconfig
from tests.helpers.oci import Fixtures

CLI = [sys.executable, "-m", "ocimodel.cli"]


def tamper(path: Path) -> None:
    """Flip one byte of a read-only blob in place (its inode, so every hardlinked tree sees it too)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.seek(10)
        byte = handle.read(1)
        handle.seek(10)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.chmod(path, 0o444)


def test_verify_reports_and_repairs_a_changed_blob(tmp_path: Path, fixtures: Fixtures) -> None:
    weights = os.urandom(300_000)
    fixtures.raw_model("verify/model:v1", {"w.bin": weights, "c.json": b"{}"})
    root = str(tmp_path / "root")
    ref = fixtures.ref("verify/model:v1")
    pulled = json.loads(subprocess.run([*CLI, "pull", ref, "--root", root, "--plain-http", "--json"], check=True,
                                       capture_output=True, text=True).stdout)
    clean = subprocess.run([*CLI, "cache", "verify", "--root", root, "--json"], capture_output=True, text=True)
    assert clean.returncode == 0 and json.loads(clean.stdout)["bad"] == []
    blob = tmp_path / "root" / "blobs" / "sha256" / Digest.of_bytes(weights).hex
    tamper(blob)
    assert (Path(pulled["path"]) / "w.bin").read_bytes() != weights  # the model's file is the same inode

    found = subprocess.run([*CLI, "cache", "verify", "--root", root, "--json"], capture_output=True, text=True)
    assert found.returncode == 6
    bad = json.loads(found.stdout)["bad"]
    key = Path(pulled["path"]).name
    assert [(b["digest"], b["models"]) for b in bad] == [(str(Digest.of_bytes(weights)), [key])]
    assert blob.exists()  # only reported

    repaired = subprocess.run([*CLI, "cache", "verify", "--repair", "--root", root, "--json"], capture_output=True,
                              text=True)
    assert repaired.returncode == 6
    entry = json.loads(repaired.stdout)["bad"][0]
    assert entry["removed_models"] == [key] and entry["kept_models"] == [] and entry["quarantined"]
    assert not blob.exists() and not Path(pulled["path"]).exists()
    again = json.loads(subprocess.run([*CLI, "pull", ref, "--root", root, "--plain-http", "--json"], check=True,
                                      capture_output=True, text=True).stdout)
    assert again["downloaded_bytes"] >= len(weights)  # fetched again
    assert (Path(again["path"]) / "w.bin").read_bytes() == weights
    assert subprocess.run([*CLI, "cache", "verify", "--root", root], capture_output=True).returncode == 0


def test_agent_verifies_on_schedule(tmp_path: Path, fixtures: Fixtures) -> None:
    from tests.test_agent import Cluster, modelcache
    weights = os.urandom(200_000)
    fixtures.raw_model("verify/agent:v1", {"w.bin": weights})
    cluster = Cluster([modelcache("m", fixtures.ref("verify/agent:v1"))], {})
    config = tmp_path / "config.yaml"
    config.write_text("verifyIntervalHours: 0.0005\n")  # every 1.8 s
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.api.url)
    root, log = tmp_path / "root", tmp_path / "agent.log"
    process = subprocess.Popen([*CLI, "agent", "--node-name", "node-a", "--kubeconfig", str(kubeconfig), "--root",
                                str(root), "--config", str(config), "--plain-http", "--metrics-address",
                                "127.0.0.1:0"], stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        blob = root / "blobs" / "sha256" / Digest.of_bytes(weights).hex
        deadline = time.monotonic() + 60
        while not blob.exists():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        tamper(blob)
        while "changed on disk" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        port = int(re.findall(r"metrics on port (\d+)", log.read_text())[0])
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert re.search(r"^ocimodel_cache_corrupt_blobs_total [1-9]", metrics, re.M)
        assert not blob.exists() and (root / "quarantine").is_dir()
    finally:
        process.terminate()
        process.wait(20)
        cluster.api.close()


@needs_root
def test_repair_never_removes_a_mounted_model(tmp_path: Path, fixtures: Fixtures) -> None:
    weights = os.urandom(100_000)
    fixtures.raw_model("verify/mounted:v1", {"w.bin": weights})
    root, target = str(tmp_path / "root"), tmp_path / "mnt"
    subprocess.run([*CLI, "mount", fixtures.ref("verify/mounted:v1"), str(target), "--root", root, "--plain-http"],
                   check=True, capture_output=True)
    try:
        blob = tmp_path / "root" / "blobs" / "sha256" / Digest.of_bytes(weights).hex
        tamper(blob)
        out = subprocess.run([*CLI, "cache", "verify", "--repair", "--root", root, "--json"], capture_output=True,
                             text=True)
        entry = json.loads(out.stdout)["bad"][0]
        assert out.returncode == 6 and entry["removed_models"] == [] and len(entry["kept_models"]) == 1
        assert entry["quarantined"] == "" and blob.exists() and (target / "w.bin").exists()
    finally:
        subprocess.run([*CLI, "umount", str(target), "--root", root], check=True, capture_output=True)
