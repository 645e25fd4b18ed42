"""Registry credentials rotated through kubelet's Secret update while the node plugin and the agent run: the
mounted Secret directory is replaced as kubelet's AtomicWriter does it (a new ``..<timestamp>`` directory, the
``..data`` symlink swapped to it by a rename, the old directory removed; ``config.json`` is a symlink to
``..data/config.json`` throughout), the registry (htpasswd) takes only the new password, and the next pull of
each process uses the new credentials without a restart."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver.proto import csi_pb2
from tests.conftest import USER, creds_for, make_client, needs_root
from tests.helpers.csi import CsiProcess, publish_request
from tests.helpers.fakekube import Cluster, modelcache, write_kubeconfig
from tests.helpers.oci import Fixtures
from tests.helpers.registry import REGISTRY_BINARY, RunningRegistry, start_registry
from tests.helpers.waiting import wait_for

pytestmark = [needs_root, pytest.mark.skipif(REGISTRY_BINARY is None or shutil.which("htpasswd") is None,
                                             reason="docker-registry or htpasswd (apache2-utils) not installed")]
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
OLD, NEW = "first-Pa55word", "second-Pa55word"


def htpasswd_line(password: str) -> bytes:
    return subprocess.run(["htpasswd", "-Bbn", USER, password], check=True, capture_output=True).stdout


def set_registry_password(htpasswd: Path, password: str) -> None:
    """Replace the registry's htpasswd file (the registry reads it again when its mtime changes)."""
    staged = htpasswd.with_suffix(".new")
    staged.write_bytes(htpasswd_line(password))
    os.replace(staged, htpasswd)


class MountedSecret:
    """A Secret volume as kubelet lays it out and updates it (pkg/volume/util/atomic_writer.go)."""

    def __init__(self, directory: Path, files: dict[str, bytes]) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.generation = 0
        current = self._write(files)
        os.symlink(current, directory / "..data")
        for name in files:
            os.symlink(f"..data/{name}", directory / name)

    def _write(self, files: dict[str, bytes]) -> str:
        self.generation += 1
        name = f"..2026_12_02_04_00_{self.generation:02d}.{os.getpid()}"
        (self.directory / name).mkdir()
        for file, data in files.items():
            (self.directory / name / file).write_bytes(data)
        return name

    def update(self, files: dict[str, bytes]) -> None:
        """Write the new payload beside the old one, swap ``..data`` to it atomically, remove the old one."""
        old = os.readlink(self.directory / "..data")
        new = self._write(files)
        os.symlink(new, self.directory / "..data_tmp")
        os.rename(self.directory / "..data_tmp", self.directory / "..data")
        shutil.rmtree(self.directory / old)


def docker_config(host: str, password: str) -> bytes:
    auth = base64.b64encode(f"{USER}:{password}".encode()).decode()
    return json.dumps({"auths": {host: {"auth": auth}}}).encode()



@pytest.fixture
def private_registry(tmp_path: Path) -> Iterator[tuple[RunningRegistry, Path]]:
    """A registry of our own (its password changes), with htpasswd auth."""
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_bytes(htpasswd_line(OLD))
    running = start_registry(tmp_path / "registry", htpasswd=htpasswd)
    yield running, htpasswd
    running.stop()


def test_a_rotated_secret_is_used_by_the_running_plugin_and_agent(
        tmp_path: Path, private_registry: tuple[RunningRegistry, Path]) -> None:
    registry, htpasswd = private_registry
    host = registry.host
    fixtures = Fixtures(make_client(credentials=creds_for(host, USER, OLD)), host)
    weights = {name: os.urandom(50_000) for name in ("before", "after", "agent-before", "agent-after", "lazy")}
    for name, data in weights.items():
        fixtures.raw_model(f"rotate/{name}:v1", {"w.bin": data})
    secret = MountedSecret(tmp_path / "etc-ocimodel-auth", {"config.json": docker_config(host, OLD)})
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps({"nodeCredentialRegistries": [host]}))  # the node's config is lent to volumes
    root = tmp_path / "root"
    node_options = ("--docker-config", str(secret.directory / "config.json"), "--config", str(config))
    objects = [modelcache("before", fixtures.ref("rotate/agent-before:v1")),
               modelcache("after", fixtures.ref("rotate/agent-after:v1"))]
    cluster = Cluster(objects, {})
    added_later = cluster.stored.pop("after")  # the agent lists only "before" at start
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", cluster.api.url)
    agent_log = tmp_path / "agent.log"
    csi = CsiProcess(tmp_path / "driver", *node_options, root=root)
    agent = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", "agent", "--node-name", "node-a", "--kubeconfig",
                              str(kubeconfig), "--root", str(root), "--plain-http", "--metrics-address", "127.0.0.1:0",
                              *node_options], stdout=agent_log.open("wb"), stderr=subprocess.STDOUT)
    pids = (csi.process.pid if csi.process else 0, agent.pid)

    published: list[tuple[str, Path]] = []

    def publish(name: str, mount: str = "bind") -> Path:
        target = tmp_path / "pods" / name / "mnt"
        published.append((f"vol-{name}", target))
        csi.node.NodePublishVolume(publish_request(f"vol-{name}", target, fixtures.ref(f"rotate/{name}:v1"),
                                                   mount=mount), timeout=120)
        return target

    try:
        assert (publish("before") / "w.bin").read_bytes() == weights["before"]
        ready = wait_for(lambda: [s for s in cluster.status_patches("before") if s.get("phase") in ("Ready", "Failed")],
                         "the agent's first pull")
        assert ready[0]["phase"] == "Ready", ready[0]

        set_registry_password(htpasswd, NEW)  # the registry rotates first: the node's Secret is stale
        with pytest.raises(grpc.RpcError) as info:
            publish("after")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()

        secret.update({"config.json": docker_config(host, NEW)})  # then kubelet swaps the Secret's ..data
        assert (publish("after") / "w.bin").read_bytes() == weights["after"]
        cluster.stored["after"] = added_later
        cluster.events.put({"type": "ADDED", "object": added_later})
        after = wait_for(lambda: [s for s in cluster.status_patches("after") if s.get("phase") in ("Ready", "Failed")],
                         "the agent's pull after the rotation")
        assert after[0]["phase"] == "Ready", after[0]
        assert after[0]["bytes"] == len(weights["agent-after"])
        if os.path.exists("/dev/fuse"):  # a lazy volume's server reads the node's config itself
            lazy = publish("lazy", mount="lazy")
            assert (lazy / "w.bin").read_bytes() == weights["lazy"]

        assert (csi.process.pid if csi.process else 0, agent.pid) == pids and csi.process and \
            csi.process.poll() is None and agent.poll() is None  # no restart
        changed = re.compile(r"credentials file .*config\.json changed; using its new contents")
        assert changed.search(csi.log_text()), csi.log_text()[-3000:]
        assert changed.search(agent_log.read_text()), agent_log.read_text()[-3000:]
        for text in (csi.log_text(), agent_log.read_text()):
            assert OLD not in text and NEW not in text
    finally:
        for volume, target in published:
            if csi.process and csi.process.poll() is None:
                csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume,
                                                                                target_path=str(target)), timeout=60)
        agent.terminate()
        agent.wait(20)
        if csi.process and csi.process.poll() is None:
            csi.stop()
        cluster.api.close()
