"""A lazy volume lives as long as its pod, not as long as the plugin (issue 18): seen from a pod's own mount
namespace, a reader holding a file of the volume open, and an mmap of it, keeps reading while the plugin is
SIGKILLed and a new one starts (the download finished, or still running); the new plugin adopts the volume,
and its NodeUnpublishVolume leaves nothing behind; servers of volumes unpublished while no plugin ran are
ended at start."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from csi_driver.lazyservers import PRIVILEGE_REASONS, mount_pod_name
from csi_driver.proto import csi_pb2
from modelcache.mounts import mounts_at
from tests.helpers.csi import CsiProcess, helper_pid
from tests.helpers.fakekube import FakeKubeAPI, Recorded, write_kubeconfig
from tests.helpers.namespaces import PLUGIN_NAMESPACE
from tests.helpers.oci import Fixtures
from tests.helpers.procs import alive, children_running, command_line
from tests.helpers.proxy import ProxyProcess
from tests.test_as_deployed import POD_UID, inline_request, kubelet_target, node, plugin, sha, stop_all, wait_until

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
              pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")]
__all__ = ["node"]  # the fixture
SIZE = 24 << 20
FUSE = "fuse.ocimodel"
READER = r"""
import hashlib, mmap, os, sys
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
view = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
print("READY", flush=True)
for line in sys.stdin:
    how, offset, size = line.split()
    offset, size = int(offset), int(size)
    try:
        if how == "read":
            data = os.pread(fd, size, offset)
        elif how == "map":
            data = view[offset:offset + size]
        else:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
        print(hashlib.sha256(data).hexdigest(), flush=True)
    except OSError as exc:
        print("ERR", exc.errno, flush=True)
"""


class Reader:
    """A container process in a mount namespace of its own (kubelet's default: private propagation) that
    holds ``path`` open and mmapped and reads it on request."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", sys.executable,
                                         "-c", READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        assert self.ask_line(None) == "READY"

    def ask_line(self, line: str | None) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        if line is not None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        answer = self.process.stdout.readline().strip()
        assert answer, f"the reader died (exit {self.process.poll()}; -7 is SIGBUS)"
        return answer

    def check(self, data: bytes, offset: int, size: int = 1 << 20) -> None:
        """The held descriptor, the mmap and a new open each read ``data[offset:offset+size]``."""
        want = sha(data[offset:offset + size])
        for how in ("read", "map", "open"):
            assert self.ask_line(f"{how} {offset} {size}") == want, f"{how} at {offset}"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(60)


def _kill_plugin(csi: CsiProcess) -> None:
    assert csi.process is not None
    csi.channel.close()
    csi.process.send_signal(signal.SIGKILL)
    csi.process.wait(60)


def _nothing_left(csi: CsiProcess, target: Path, server: int) -> None:
    wait_until(lambda: not alive(server), 60, f"server {server} to end")
    assert not target.exists() and not mounts_at(target)
    lazy = csi.root / "csi" / "lazy"
    assert not list(lazy.glob("*.server.json")) and not list(lazy.glob("*.sock")), list(lazy.iterdir())
    assert not list((csi.root / "csi" / "publications").glob("*.json"))


def _unpublish(csi: CsiProcess, volume: str, target: Path) -> None:
    request = inline_request(volume, target, "x/y:z")
    csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=request.volume_id,
                                                                    target_path=str(target)))


def _metric(csi: CsiProcess, outcome: str) -> str:
    port = re.findall(r"metrics on port (\d+)", csi.log_text())[-1]
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found = re.findall(rf'ocimodel_csi_lazy_restores_total{{outcome="{outcome}"}} (\S+)', text)
    return found[0] if found else "0"


@pytest.mark.parametrize("download", ["finished", "running"])
def test_readers_keep_reading_through_a_plugin_sigkill_and_the_new_plugin_adopts(
        node: Path, fixtures: Fixtures, registry, download: str) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(SIZE)
    fixtures.raw_model("lifetime/model:v1", {"weights.safetensors": data, "config.json": b"{}"})
    proxy = ProxyProcess(registry.host, gate=download == "running", log=str(node / "proxy.log"))  # held till opened
    csi = plugin(node, "--metrics-address", "127.0.0.1:0")
    reader = None
    try:
        target = kubelet_target(node / "pods", POD_UID, "model")
        csi.node.NodePublishVolume(inline_request("model", target, f"{proxy.host}/lifetime/model:v1", mount="lazy"))
        reader = Reader(target / "weights.safetensors")  # the container starts on the FUSE view
        reader.check(data, SIZE - (1 << 20))
        server = helper_pid(csi, target)
        blob = csi.root / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
        if download == "finished":
            wait_until(lambda: mounts_at(target)[-1].fstype != FUSE, 60, "the finished tree")
        else:
            assert not blob.exists()

        _kill_plugin(csi)  # a crash, a deleted plugin pod, a rollout: no goodbye
        reader.check(data, 4 << 20)  # while no plugin runs
        csi.start()

        assert "adopted lazy volume" in csi.log_text() and "ModelVolumeRestored" not in csi.log_text()
        assert alive(server) and helper_pid(csi, target) == server  # the same server: never a second one
        assert _metric(csi, "adopted") == "1.0"
        for offset in (0, 8 << 20, SIZE - 4096):
            reader.check(data, offset, 4096)
        if download == "running":
            assert not blob.exists()  # still held: everything above was read while it ran
            proxy.open_gate()
            wait_until(blob.exists, 120, "the download to finish")
            wait_until(lambda: mounts_at(target)[-1].fstype != FUSE, 60, "the finished tree")
        reader.check(data, 0, SIZE)  # every byte, through the held descriptor, the mmap and a new open
        csi.node.NodePublishVolume(inline_request("model", target, f"{proxy.host}/lifetime/model:v1", mount="lazy"))
        reader.close()
        reader = None
        _unpublish(csi, "model", target)  # through the new plugin
        _nothing_left(csi, target, server)
    finally:
        if reader is not None:
            reader.close()
        stop_all(csi)
        proxy.close()


def test_servers_of_volumes_unpublished_while_no_plugin_ran_are_ended_at_start(
        node: Path, fixtures: Fixtures, registry) -> None:  # type: ignore[no-untyped-def]
    fixtures.raw_model("lifetime/orphan:v1", {"weights.safetensors": os.urandom(SIZE)})
    proxy = ProxyProcess(registry.host, bytes_per_second=1_000_000, log=str(node / "proxy.log"))
    csi = plugin(node)
    try:
        by_hand = kubelet_target(node / "pods", POD_UID, "by-hand")
        no_record = kubelet_target(node / "pods", POD_UID, "no-record")
        for volume, target in (("by-hand", by_hand), ("no-record", no_record)):
            csi.node.NodePublishVolume(inline_request(volume, target, f"{proxy.host}/lifetime/orphan:v1",
                                                      mount="lazy"))
        servers = {target: helper_pid(csi, target) for target in (by_hand, no_record)}
        _kill_plugin(csi)
        subprocess.run(["umount", "--lazy", str(by_hand)], check=True)  # unpublished while no plugin ran
        record = next(p for p in (csi.root / "csi" / "publications").glob("*.json")
                      if f'"target_path": "{no_record}"' in p.read_text())
        record.unlink()  # a server whose volume this plugin knows nothing of
        assert alive(servers[no_record])
        csi.start()
        assert "was unmounted while no plugin ran" in csi.log_text()
        assert "which has no record" in csi.log_text()
        for target, server in servers.items():
            _nothing_left(csi, target, server)
        for volume, target in (("by-hand", by_hand), ("no-record", no_record)):
            _unpublish(csi, volume, target)  # kubelet's late unpublish: an unknown target is fine
    finally:
        stop_all(csi)
        proxy.close()


def _waiting_spare(csi: CsiProcess, other_than: int = 0) -> int:
    """The pid of the plugin's spare server once it waits for a job (its socket exists)."""
    assert csi.process is not None
    found: list[int] = []

    def look() -> bool:
        for pid in children_running(csi.process.pid, b"fuse-serve"):  # type: ignore[union-attr]
            args = (command_line(pid) or b"").split(b"\0")
            waiting = b"--socket" in args and Path(os.fsdecode(args[args.index(b"--socket") + 1])).exists()
            if pid != other_than and b"--spare-of" in args and waiting:
                found[:] = [pid]
                return True
        return False

    wait_until(look, 120, "a spare server waiting for its job")
    return found[0]


def _nice(pid: int) -> set[int]:
    """The nice values of every thread of ``pid``."""
    return {int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])
            for task in Path(f"/proc/{pid}/task").iterdir()}


def test_a_spare_server_takes_the_first_lazy_volume_and_ends_with_its_plugin(
        node: Path, fixtures: Fixtures, registry) -> None:  # type: ignore[no-untyped-def]
    data, other = os.urandom(SIZE), os.urandom(SIZE)
    fixtures.raw_model("lifetime/spare:v1", {"weights.safetensors": data})
    fixtures.raw_model("lifetime/spare:v2", {"weights.safetensors": other})  # not cached: a lazy server again
    csi = plugin(node)
    readers: list[Reader] = []
    try:
        spare = _waiting_spare(csi)
        assert csi.process is not None
        plugin_nice = _nice(csi.process.pid)
        assert _nice(spare) == {19}  # its start costs a download nothing (root may raise it again)
        first = kubelet_target(node / "pods", POD_UID, "first")
        csi.node.NodePublishVolume(inline_request("first", first, f"{registry.host}/lifetime/spare:v1", mount="lazy"))
        assert helper_pid(csi, first) == spare  # the spare serves it ...
        assert _nice(spare) == plugin_nice  # ... at the plugin's priority, every thread
        readers.append(Reader(first / "weights.safetensors"))
        readers[-1].check(data, 0, SIZE)
        log = csi.root / "csi" / "lazy" / f"{hashlib.sha256(str(first).encode()).hexdigest()[:16]}.log"
        assert f"serving {registry.host}/lifetime/spare:v1" in log.read_text()  # its log is the volume's

        second_spare = _waiting_spare(csi, other_than=spare)  # the next one is started at once
        os.kill(second_spare, signal.SIGKILL)
        wait_until(lambda: not alive(second_spare), 60, "the killed spare to end")
        second = kubelet_target(node / "pods", POD_UID, "second")
        csi.node.NodePublishVolume(inline_request("second", second, f"{registry.host}/lifetime/spare:v2",
                                                  mount="lazy"))
        server = helper_pid(csi, second)  # a server of its own: no spare was waiting
        assert server not in (spare, second_spare) and _nice(server) == plugin_nice
        readers.append(Reader(second / "weights.safetensors"))
        readers[-1].check(other, 0, SIZE)

        third_spare = _waiting_spare(csi, other_than=second_spare)
        _kill_plugin(csi)
        wait_until(lambda: not alive(third_spare), 60, "the unused spare to end with its plugin")
        for reader, content in zip(readers, (data, other), strict=True):  # the volumes' servers keep serving
            reader.check(content, 0, SIZE)
        csi.start()
        assert helper_pid(csi, first) == spare and helper_pid(csi, second) == server  # adopted, not replaced
        for reader in readers:
            reader.close()
        readers = []
        _unpublish(csi, "first", first)
        _unpublish(csi, "second", second)
        _nothing_left(csi, first, spare)
        _nothing_left(csi, second, server)
    finally:
        for reader in readers:
            reader.close()
        stop_all(csi)


def test_a_lazy_server_may_open_a_file_per_blob(node: Path, fixtures: Fixtures, registry) -> None:  # type: ignore[no-untyped-def]
    """A server keeps a descriptor per committed blob it reads: it raises its soft limit of open files to the
    hard one (a container's default soft limit, often 1024, is below a model of thousands of files)."""
    fixtures.raw_model("lifetime/files:v1", {"weights.safetensors": os.urandom(1 << 20)})
    csi = CsiProcess(node / "plugin", mode="node", root=node / "cache", kubeconfig="none",
                     prefix=("prlimit", "--nofile=256:4096", "--", *PLUGIN_NAMESPACE))
    try:
        target = kubelet_target(node / "pods", POD_UID, "files")
        csi.node.NodePublishVolume(inline_request("files", target, f"{registry.host}/lifetime/files:v1",
                                                  mount="lazy"))
        limits = Path(f"/proc/{helper_pid(csi, target)}/limits").read_text()
        assert re.search(r"Max open files\s+4096\s+4096", limits), limits
        _unpublish(csi, "files", target)
    finally:
        stop_all(csi)


# -- mount pods (the runner in a cluster), against the HTTP-level fake API server ----------------------------
NAMESPACE = "ocimodel-system"
OWN_POD = "ocimodel-node-x7k2p"
IMAGE = "ghcr.io/ocimodel/ocimodel:0.1.0@sha256:" + "ab" * 32
PODS = f"/api/v1/namespaces/{NAMESPACE}/pods"


def _status(code: int, reason: str) -> tuple[int, dict[str, Any]]:
    return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code}


class FakeKubelet:
    """The API server's pods in the plugin's namespace, and a kubelet that runs each mount pod's container as
    a process of this machine (its args are the image's entrypoint arguments)."""

    def __init__(self, api: FakeKubeAPI, root: Path, logs: Path) -> None:
        self.api, self.root, self.logs = api, root, logs
        self.pods: dict[str, dict[str, Any]] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        own = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": OWN_POD, "namespace": NAMESPACE},
               "spec": {"nodeName": "node-a", "containers": [
                   {"name": "ocimodel-csi", "image": IMAGE, "volumeMounts": [
                       {"name": "kubelet-pods", "mountPath": "/var/lib/kubelet/pods"},
                       {"name": "cache", "mountPath": str(root)}]},
                   {"name": "ocimodel-agent", "image": IMAGE}],
                   "volumes": [{"name": "kubelet-pods", "hostPath": {"path": "/var/lib/kubelet/pods"}},
                               {"name": "cache", "hostPath": {"path": "/var/lib/ocimodel"}}]},
               "status": {"phase": "Running"}}
        api.route("GET", f"{PODS}/{OWN_POD}", (200, own))
        api.route("POST", PODS, lambda r: self.create(r.body))
        api.route("GET", PODS, self.list)

    def expect(self, name: str) -> None:
        """Answer reads and deletes of pod ``name`` (the fake routes exact paths)."""
        self.api.route("GET", f"{PODS}/{name}", lambda _r: self.get(name))
        self.api.route("DELETE", f"{PODS}/{name}", lambda _r: self.delete(name))

    def create(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = body["metadata"]["name"]
        if name in self.pods:
            return _status(409, "AlreadyExists")
        self.pods[name] = body
        args = body["spec"]["containers"][0]["args"]
        with (self.logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen([sys.executable, "-m", "ocimodel.cli", *args], stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
        return 201, body

    def _with_status(self, name: str) -> dict[str, Any]:
        process = self.processes.get(name)
        code = process.poll() if process else None
        phase = "Pending" if process is None else "Running" if code is None else "Succeeded" if code == 0 else "Failed"
        return {**self.pods[name], "status": {"phase": phase}}

    def get(self, name: str) -> tuple[int, Any]:
        return (200, self._with_status(name)) if name in self.pods else _status(404, "NotFound")

    def list(self, request: Recorded) -> tuple[int, Any]:
        wanted = dict(pair.split("=") for pair in request.query["labelSelector"][0].split(","))
        items = [self._with_status(n) for n, p in self.pods.items()
                 if all(p["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]
        return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}

    def delete(self, name: str) -> tuple[int, Any]:
        pod = self.pods.pop(name, None)
        if pod is None:
            return _status(404, "NotFound")
        process = self.processes.pop(name, None)
        if process is not None and process.poll() is None:
            process.terminate()  # kubelet stops the container
        if process is not None:
            process.wait(60)
        return 200, pod


def expected_mount_pod(name: str, target: Path, volume_id: str, root: Path) -> dict[str, Any]:
    """Exactly the Pod the plugin must create for a lazy volume."""
    socket_path = root / "csi" / "lazy" / f"{hashlib.sha256(str(target).encode()).hexdigest()[:16]}.sock"
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE,
                     "labels": {"app.kubernetes.io/name": "ocimodel-mount", "ocimodel.csi.dev/mount-pod": "true",
                                "ocimodel.csi.dev/node": "node-a",
                                "ocimodel.csi.dev/volume": hashlib.sha256(volume_id.encode()).hexdigest()[:40]},
                     "annotations": {"ocimodel.csi.dev/target": str(target), **PRIVILEGE_REASONS}},
        "spec": {
            "nodeName": "node-a", "restartPolicy": "Never", "priorityClassName": "system-node-critical",
            "serviceAccountName": "ocimodel-mount", "automountServiceAccountToken": False,
            "enableServiceLinks": False, "terminationGracePeriodSeconds": 30,
            "tolerations": [{"operator": "Exists"}],
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "fuse", "image": IMAGE, "args": ["fuse-serve", "--socket", str(socket_path)],
                "securityContext": {"privileged": True, "readOnlyRootFilesystem": True},
                "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                "volumeMounts": [
                    {"name": "kubelet-pods", "mountPath": "/var/lib/kubelet/pods", "mountPropagation": "Bidirectional"},
                    {"name": "cache", "mountPath": str(root), "mountPropagation": "HostToContainer"},
                    {"name": "dev-fuse", "mountPath": "/dev/fuse"},
                    {"name": "tmp", "mountPath": "/tmp"}]}],
            "volumes": [
                {"name": "kubelet-pods", "hostPath": {"path": "/var/lib/kubelet/pods", "type": "Directory"}},
                {"name": "cache", "hostPath": {"path": "/var/lib/ocimodel", "type": "Directory"}},
                {"name": "dev-fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]}}


def test_mount_pods_are_created_adopted_reused_on_409_and_deleted(tmp_path: Path, fixtures: Fixtures,
                                                                   registry) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(SIZE)
    fixtures.raw_model("lifetime/pods:v1", {"weights.safetensors": data})
    proxy = ProxyProcess(registry.host, bytes_per_second=2_000_000, log=str(tmp_path / "proxy.log"))
    api = FakeKubeAPI()
    root = tmp_path / "driver" / "root"
    kubelet = FakeKubelet(api, root, tmp_path)
    targets = [kubelet_target(tmp_path / "pods", POD_UID, volume) for volume in ("first", "second")]
    names = [mount_pod_name("node-a", str(target)) for target in targets]
    for name in [*names, "ocimodel-mount-orphan"]:
        kubelet.expect(name)
    orphan = expected_mount_pod("ocimodel-mount-orphan", tmp_path / "gone", "gone", root)
    kubelet.pods["ocimodel-mount-orphan"] = orphan  # its volume was unpublished while no plugin ran
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api.url)
    csi = CsiProcess(tmp_path / "driver", "--pod-name", OWN_POD, "--pod-namespace", NAMESPACE, root=root,
                     kubeconfig=str(kubeconfig))
    try:
        wait_until(lambda: "ocimodel-mount-orphan" not in kubelet.pods, 60, "the orphan's deletion")
        assert any(r.method == "GET" and r.path == PODS and r.query == {
            "labelSelector": ["ocimodel.csi.dev/mount-pod=true,ocimodel.csi.dev/node=node-a"]} for r in api.requests)
        first = inline_request("first", targets[0], f"{proxy.host}/lifetime/pods:v1", mount="lazy")
        csi.node.NodePublishVolume(first)
        posts = [r for r in api.requests if r.method == "POST" and r.path == PODS]
        assert len(posts) == 1 and posts[0].body == expected_mount_pod(names[0], targets[0], first.volume_id, root)
        assert "docker_config" not in json.dumps(posts[0].body)  # credentials travel over the socket only
        with open(targets[0] / "weights.safetensors", "rb") as handle:
            handle.seek(SIZE - 4096)
            assert handle.read() == data[-4096:]

        _kill_plugin(csi)
        csi.start()  # adopts by list: no new pod, the same one serves
        assert "adopted lazy volume" in csi.log_text()
        assert len([r for r in api.requests if r.method == "POST"]) == 1
        assert (targets[0] / "weights.safetensors").stat().st_size == SIZE

        # a pod for the second target exists already (its plugin died before recording it): 409, handed the job
        kubelet.create({**posts[0].body, "metadata": {**posts[0].body["metadata"], "name": names[1],
                                                        "annotations": {"ocimodel.csi.dev/target": str(targets[1])}},
                        "spec": {**posts[0].body["spec"], "containers": [{
                            **posts[0].body["spec"]["containers"][0],
                            "args": ["fuse-serve", "--socket",
                                     expected_mount_pod(names[1], targets[1], "", root)["spec"]["containers"][0]
                                     ["args"][2]]}]}})
        before = len(api.requests)
        second = inline_request("second", targets[1], f"{proxy.host}/lifetime/pods:v1", mount="lazy")
        csi.node.NodePublishVolume(second)
        calls = [(r.method, r.path) for r in api.requests[before:] if not r.path.endswith(OWN_POD)]
        assert calls[:2] == [("POST", PODS), ("GET", f"{PODS}/{names[1]}")]  # 409, then adopted
        assert len(kubelet.processes) == 2  # one server per target
        with open(targets[1] / "weights.safetensors", "rb") as handle:
            assert handle.read(4096) == data[:4096]

        for volume, target, name in (("first", targets[0], names[0]), ("second", targets[1], names[1])):
            process = kubelet.processes[name]
            _unpublish(csi, volume, target)
            assert not target.exists() and not mounts_at(target)
            assert name not in kubelet.pods and process.poll() is not None  # deleted after the unmount
        assert any(r.method == "DELETE" and r.path == f"{PODS}/{names[0]}" for r in api.requests)
    finally:
        stop_all(csi)
        for process in kubelet.processes.values():
            process.kill()
        for target in targets:
            subprocess.run(["umount", "--lazy", str(target)], check=False, capture_output=True)
        proxy.close()
        api.close()
