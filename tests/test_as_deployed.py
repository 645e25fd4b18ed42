"""The plugin driven exactly as real Kubernetes components drive it: the volume context kubelet sends for
inline volumes (podInfoOnMount) and for PVs made by the external-provisioner, the controller started as
deploy/ starts it, the node plugin in its own mount namespace with Bidirectional propagation checked from
the host's and a pod's namespace, and plugin restarts seen from a pod that holds the volume."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
import yaml

from csi_driver.proto import csi_pb2, csi_pb2_grpc
from modelcache.mounts import mount_options, mounts_at
from tests.conftest import needs_root
from tests.helpers.csi import CsiProcess, Mode, code_of, helper_pid, mount_capability
from tests.helpers.fakekube import FakeKubeAPI, write_kubeconfig
from tests.helpers.kustomize import render
from tests.helpers.namespaces import PLUGIN_NAMESPACE, PodView, share, unmount_tree
from tests.helpers.oci import Fixtures
from tests.helpers.procs import alive
from tests.helpers.proxy import ProxyProcess

pytestmark = [needs_root, pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare (util-linux) missing")]
needs_fuse = pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="/dev/fuse is missing")
ROOT = Path(__file__).resolve().parent.parent
POD_UID = "3f0b5a52-8c1e-4a8e-9a51-0c1d2e3f4a5b"
PROVISIONER_IDENTITY = {"storage.kubernetes.io/csiProvisionerIdentity": "1763900000000-7081-ocimodel.csi.dev"}
SIZE = 24 << 20


def pod_info(name: str = "llm-0", namespace: str = "inference", uid: str = POD_UID) -> dict[str, str]:
    """What kubelet adds to the volume context when the CSIDriver has podInfoOnMount: true."""
    return {"csi.storage.k8s.io/pod.name": name, "csi.storage.k8s.io/pod.namespace": namespace,
            "csi.storage.k8s.io/pod.uid": uid, "csi.storage.k8s.io/serviceAccount.name": "default"}


def kubelet_target(pods: Path, uid: str, volume: str) -> Path:
    """Kubelet's target path for a CSI volume; kubelet creates the parent, the plugin the target."""
    parent = pods / uid / "volumes" / "kubernetes.io~csi" / volume
    parent.mkdir(parents=True, exist_ok=True)
    return parent / "mount"


def inline_request(volume: str, target: Path, reference: str, **attributes: str) -> csi_pb2.NodePublishVolumeRequest:
    """An inline ephemeral volume as kubelet publishes it for a pod spec without readOnly: true."""
    context = {"reference": reference, **attributes, **pod_info(), "csi.storage.k8s.io/ephemeral": "true"}
    return csi_pb2.NodePublishVolumeRequest(
        volume_id=f"csi-{hashlib.sha256(volume.encode()).hexdigest()}", target_path=str(target), readonly=False,
        volume_capability=mount_capability(Mode.SINGLE_NODE_WRITER), volume_context=context)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_until(predicate, timeout: float = 60.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def assert_read_only_everywhere(target: Path, files: dict[str, bytes]) -> None:
    """Read-only, nosuid and nodev in the host's namespace and in a pod's; content equal; writes refused."""
    assert {"ro", "nosuid", "nodev"} <= mount_options(target), mounts_at(target)
    with pytest.raises(OSError) as info:
        (target / "planted").write_bytes(b"x")
    assert info.value.errno == 30  # EROFS, even for root
    pod = PodView(target)
    try:
        assert {"ro", "nosuid", "nodev"} <= pod.options()
        assert pod.create("planted") == "ERR EROFS"
        for name, data in files.items():
            assert pod.append(name) == "ERR EROFS"
            assert pod.sha256(name) == sha(data)
    finally:
        pod.close()


@pytest.fixture
def node(registry) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """A node directory whose mounts propagate between the host and the plugin's namespace."""
    base = Path(tempfile.mkdtemp(prefix="ocimodel-node-"))
    share(base)
    yield base
    unmount_tree(base)
    shutil.rmtree(base, ignore_errors=True)


def plugin(node: Path, *extra: str, kubeconfig: str = "none") -> CsiProcess:
    """The node plugin in its own mount namespace, cache root and pods directory shared with the host."""
    return CsiProcess(node / "plugin", *extra, mode="node", root=node / "cache", prefix=PLUGIN_NAMESPACE,
                      kubeconfig=kubeconfig)


def stop_all(csi: CsiProcess) -> None:
    if csi.process and csi.process.poll() is None:
        csi.stop()


# -- the mount itself ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["bind_detached_readonly", "bind_via_private_staging", "bind_mount_readonly"])
def test_read_only_bind_propagates_read_only(node: Path, how: str) -> None:
    """Both ways of mounting (mount_setattr on a detached copy; a private read-only staging mount for
    kernels before 5.12) hand the host a read-only, nosuid, nodev copy; the staging mount leaves no trace."""
    source, target = node / "tree", node / "pods" / "t"
    source.mkdir()
    (source / "f").write_bytes(b"weights")
    target.mkdir(parents=True)
    code = f"import sys; from modelcache import mounts; mounts.{how}(sys.argv[1], sys.argv[2])"
    subprocess.run([*PLUGIN_NAMESPACE, sys.executable, "-c", code, str(source), str(target)], check=True, cwd=ROOT)
    assert {"ro", "nosuid", "nodev"} <= mount_options(target)
    assert (target / "f").read_bytes() == b"weights"
    assert not any("ocimodel-staging" in line for line in Path("/proc/self/mountinfo").read_text().splitlines())
    with pytest.raises(OSError):
        (target / "f").write_bytes(b"altered")


# -- inline volumes, as kubelet sends them -----------------------------------------------------------------

def test_inline_bind_volume_is_read_only_in_every_namespace(node: Path, fixtures: Fixtures) -> None:
    files = {"model.safetensors": os.urandom(300_000), "config.json": b'{"ok": 1}'}
    fixtures.raw_model("deployed/bind:v1", files)
    csi = plugin(node)
    try:
        target = kubelet_target(node / "pods", POD_UID, "model")
        csi.node.NodePublishVolume(inline_request("model", target, fixtures.ref("deployed/bind:v1")))
        assert_read_only_everywhere(target, files)
        blob = node / "cache" / "blobs" / "sha256" / sha(files["model.safetensors"])
        assert sha(blob.read_bytes()) == sha(files["model.safetensors"])  # the shared blob is untouched
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=inline_request("model", target, "x/y:z").volume_id, target_path=str(target)))
        assert not target.exists()
    finally:
        stop_all(csi)


@needs_fuse
def test_inline_lazy_volume_is_read_only_in_every_namespace(node: Path, fixtures: Fixtures, registry) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(SIZE)
    files = {"weights.safetensors": data, "config.json": b'{"lazy": 1}'}
    fixtures.raw_model("deployed/lazy:v1", files)
    proxy = ProxyProcess(registry.host, gate=True, log=str(node / "proxy.log"))
    csi = plugin(node)
    try:
        target = kubelet_target(node / "pods", POD_UID, "lazy")
        csi.node.NodePublishVolume(inline_request("lazy", target, f"{proxy.host}/deployed/lazy:v1", mount="lazy"))
        assert mounts_at(target)[-1].fstype == "fuse.ocimodel"  # the gate holds the weights: the FUSE view
        assert_read_only_everywhere(target, {"config.json": files["config.json"]})
        assert mounts_at(target)[-1].fstype == "fuse.ocimodel"  # checked on the FUSE view, not the finished tree
        proxy.open_gate()
        wait_until(lambda: mounts_at(target)[-1].fstype != "fuse.ocimodel", 60, "the finished tree")
        assert_read_only_everywhere(target, files)  # the finished tree stacked on top, from the helper
    finally:
        stop_all(csi)
        proxy.close()


# -- PersistentVolumes made by the external-provisioner ------------------------------------------------------

def test_provisioned_volume_mounts_with_the_provisioners_keys(node: Path, fixtures: Fixtures) -> None:
    files = {"w.bin": os.urandom(50_000)}
    digest = fixtures.raw_model("deployed/pv:v1", files)
    csi = CsiProcess(node / "all", mode="all", root=node / "cache", prefix=PLUGIN_NAMESPACE)
    try:
        # CreateVolume as csi-provisioner --extra-create-metadata sends it for a PVC of our StorageClass
        parameters = {"reference": fixtures.ref("deployed/pv:v1"), "csi.storage.k8s.io/pvc/name": "weights",
                      "csi.storage.k8s.io/pvc/namespace": "inference",
                      "csi.storage.k8s.io/pv/name": "pvc-8d5e1c3a-0b7f-4f63-9a1e-5c2d4b3a2f10"}
        volume = csi.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name="pvc-8d5e1c3a-0b7f-4f63-9a1e-5c2d4b3a2f10", parameters=parameters,
            volume_capabilities=[mount_capability(Mode.MULTI_NODE_READER_ONLY)],
            capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30))).volume
        assert volume.volume_context["reference"].endswith(f"@{digest}")
        # kubelet passes the PV's volumeAttributes (with the provisioner's identity key) plus pod info
        context = {**volume.volume_context, **PROVISIONER_IDENTITY, **pod_info()}
        target = kubelet_target(node / "pods", POD_UID, "pvc-8d5e1c3a")
        request = csi_pb2.NodePublishVolumeRequest(
            volume_id=volume.volume_id, target_path=str(target), readonly=False,
            volume_capability=mount_capability(Mode.MULTI_NODE_READER_ONLY), volume_context=context)
        csi.node.NodePublishVolume(request)
        assert_read_only_everywhere(target, files)
        csi.node.NodePublishVolume(request)  # kubelet's retry: idempotent

        typo = csi_pb2.NodePublishVolumeRequest()
        typo.CopyFrom(request)
        typo.target_path = str(kubelet_target(node / "pods", POD_UID, "typo"))
        typo.volume_context["refrence"] = "oops"
        with pytest.raises(grpc.RpcError) as info:
            csi.node.NodePublishVolume(typo)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "refrence" in (info.value.details() or "") and "reference" in (info.value.details() or "")
        bad_class = csi_pb2.CreateVolumeRequest(name="pvc-typo", parameters={**parameters, "mout": "lazy"},
                                                volume_capabilities=[mount_capability(Mode.MULTI_NODE_READER_ONLY)])
        assert code_of(csi.controller.CreateVolume, bad_class) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stop_all(csi)


# -- the controller as deploy/ starts it ---------------------------------------------------------------------

def test_controller_as_deployed_becomes_ready_and_provisions(fixtures: Fixtures) -> None:
    fixtures.raw_model("deployed/ctl:v1", {"w": b"controller"})
    objects = render("deploy/base")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if "ocimodel" in c["image"])
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and security["runAsNonRoot"]
    uid = security["runAsUser"]
    work = Path(tempfile.mkdtemp(prefix="ocimodel-controller-"))
    work.chmod(0o755)
    try:
        # the pod's volumes: emptyDirs for the socket and the state, the ConfigMap and the Secret
        volumes = {m["mountPath"]: work / m["name"] for m in container["volumeMounts"]}
        for directory in volumes.values():
            directory.mkdir()
        config_map = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
        config = yaml.safe_load(config_map["config.yaml"])
        config["plainHTTP"] = True  # the test registry speaks plain HTTP on loopback
        config["dockerConfig"] = str(volumes["/etc/ocimodel/auth"] / "config.json")
        (volumes["/etc/ocimodel/config"] / "config.yaml").write_text(yaml.safe_dump(config))
        (volumes["/etc/ocimodel/auth"] / "config.json").write_text('{"auths": {}}')
        for path in volumes.values():
            os.chown(path, uid, uid)
        args = []
        for arg in container["args"]:
            for mount_path, host_path in volumes.items():
                arg = arg.replace(f"={mount_path}", f"={host_path}").replace(f"unix://{mount_path}", f"unix://{host_path}")
            if arg.startswith("--metrics-address="):
                arg = "--metrics-address=127.0.0.1:0"
            args.append(arg)
        # a read-only root filesystem with only the pod's volumes writable, as uid 65532, no kubeconfig.
        # CAP_DAC_READ_SEARCH only lets it reach this machine's interpreter under /root (mode 0700); it
        # grants no write access anywhere.
        binds = " && ".join(f"mount --bind {p} {p}" for p in volumes.values())
        script = (f"{binds} && mount -o remount,bind,ro / && exec setpriv --reuid={uid} --regid={uid} --clear-groups "
                  f"--inh-caps=+dac_read_search --ambient-caps=+dac_read_search "
                  f"{sys.executable} -m ocimodel.cli {' '.join(args)}")
        log = work / "controller.log"
        env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONPATH": str(ROOT)}
        process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                                   env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd="/")
        try:
            socket_path = volumes["/csi"] / "csi.sock"
            channel = grpc.insecure_channel(f"unix:{socket_path}")
            identity = csi_pb2_grpc.IdentityStub(channel)
            ready, answer = False, ""
            deadline = time.monotonic() + 60  # a guard against a hang only
            while time.monotonic() < deadline and not ready and process.poll() is None:
                try:  # as csi-provisioner does before anything else
                    ready = identity.Probe(csi_pb2.ProbeRequest(), timeout=1).ready.value
                except grpc.RpcError as exc:
                    answer = f"{exc.code()}: {exc.details()}"
                    time.sleep(0.1)
            assert ready, f"{answer}\n{log.read_text()}"
            controller = csi_pb2_grpc.ControllerStub(channel)
            volume = controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                name="pvc-1", parameters={"reference": fixtures.ref("deployed/ctl:v1"),
                                          "csi.storage.k8s.io/pvc/name": "p",
                                          "csi.storage.k8s.io/pvc/namespace": "n",
                                          "csi.storage.k8s.io/pv/name": "pvc-1"},
                volume_capabilities=[mount_capability(Mode.MULTI_NODE_READER_ONLY)]), timeout=30).volume
            assert "@sha256:" in volume.volume_context["reference"]
            channel.close()
        finally:
            process.terminate()
            process.wait(20)
        text = log.read_text()
        assert "Traceback" not in text, text
        assert "no Kubernetes API access" in text  # said once, in one line
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- plugin restarts, seen from the pods ------------------------------------------------------------------------

def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(pid), 60, f"process {pid} to end")


def _events(api: FakeKubeAPI) -> list[dict]:  # type: ignore[type-arg]
    return [r.body for r in api.requests if r.method == "POST" and r.path.endswith("/events")]


@needs_fuse
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_plugin_pod_replacement_keeps_every_volume(node: Path, fixtures: Fixtures, registry, sig: int) -> None:  # type: ignore[no-untyped-def]
    small = {"model.safetensors": os.urandom(100_000)}
    fixtures.raw_model("restart/bind:v1", small)
    done_data, slow_data = os.urandom(SIZE), os.urandom(SIZE)
    fixtures.raw_model("restart/done:v1", {"weights.safetensors": done_data})
    fixtures.raw_model("restart/slow:v1", {"weights.safetensors": slow_data})
    fast = ProxyProcess(registry.host, gate=True, log=str(node / "fast.log"))  # opened once a container holds it
    slow = ProxyProcess(registry.host, gate=True, log=str(node / "slow.log"))  # held across the restart
    api = FakeKubeAPI()
    api.route("POST", "/api/v1/namespaces/inference/events", (201, {"kind": "Event", "apiVersion": "v1"}))
    kubeconfig = write_kubeconfig(node / "kubeconfig", api.url)
    csi = plugin(node, "--metrics-address", "127.0.0.1:0", kubeconfig=str(kubeconfig))
    pods: list[PodView] = []
    try:
        bind_target = kubelet_target(node / "pods", POD_UID, "bind")
        done_target = kubelet_target(node / "pods", POD_UID, "done")
        slow_target = kubelet_target(node / "pods", POD_UID, "slow")
        csi.node.NodePublishVolume(inline_request("bind", bind_target, fixtures.ref("restart/bind:v1")))
        csi.node.NodePublishVolume(inline_request("done", done_target, f"{fast.host}/restart/done:v1", mount="lazy"))
        early = PodView(done_target)  # a container started while the download was still running
        pods.append(early)
        assert mounts_at(done_target)[-1].fstype == "fuse.ocimodel" and early.listing() == ["weights.safetensors"]
        fast.open_gate()
        csi.node.NodePublishVolume(inline_request("slow", slow_target, f"{slow.host}/restart/slow:v1", mount="lazy"))
        wait_until(lambda: mounts_at(done_target)[-1].fstype != "fuse.ocimodel", 60, "the finished tree")
        bind_pod, done_pod = PodView(bind_target), PodView(done_target)
        slow_pod = PodView(slow_target, propagation="slave")  # mountPropagation: HostToContainer
        pods += [bind_pod, done_pod, slow_pod]
        helpers = [helper_pid(csi, done_target), helper_pid(csi, slow_target)]

        # the DaemonSet rollout: the plugin and its FUSE helpers end, pods keep running
        assert csi.process is not None
        csi.process.send_signal(sig)
        csi.process.wait(60)
        for pid in helpers:
            _kill(pid)
        csi.start()

        wait_until(lambda: csi.log_text().count("ModelVolumeRestored") >= 2, 60, "both lazy volumes restored")
        assert "ModelVolumeLost" not in csi.log_text()
        # the host, and containers that (re)start now, see every model in full
        assert mounts_at(done_target)[-1].fstype != "fuse.ocimodel"
        for target, name, data in ((bind_target, "model.safetensors", small["model.safetensors"]),
                                   (done_target, "weights.safetensors", done_data),
                                   (slow_target, "weights.safetensors", slow_data)):
            assert {"ro", "nosuid", "nodev"} <= mount_options(target)
            restarted = PodView(target)
            pods.append(restarted)
            assert restarted.sha256(name) == sha(data), target
        # running containers: a bind volume and a finished lazy one keep working; HostToContainer follows
        assert bind_pod.sha256("model.safetensors") == sha(small["model.safetensors"])
        assert done_pod.sha256("weights.safetensors") == sha(done_data)
        assert slow_pod.sha256("weights.safetensors") == sha(slow_data)
        # the one case no plugin can repair fails loudly in the container, never as an empty directory
        assert early.listing() in ("ERR ENOTCONN", "ERR ECONNABORTED")

        events = _events(api)
        assert {e["reason"] for e in events} == {"ModelVolumeRestored"} and len(events) == 2
        assert all(e["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "inference",
                                           "name": "llm-0", "uid": POD_UID} for e in events)
        assert any("bind-mounted" in e["message"] for e in events)
        assert any("resumes the download" in e["message"] for e in events)
        metrics = requests.get(f"http://127.0.0.1:{_metrics_port(csi)}/metrics", timeout=5).text
        assert 'ocimodel_csi_lazy_restores_total{outcome="bind"} 1.0' in metrics
        assert 'ocimodel_csi_lazy_restores_total{outcome="helper"} 1.0' in metrics
        for pod in pods:  # kubelet unpublishes once the pod's containers are gone
            pod.close()
        pods.clear()
        for target, volume in ((bind_target, "bind"), (done_target, "done"), (slow_target, "slow")):
            request = inline_request(volume, target, "x/y:z")
            csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=request.volume_id,
                                                                            target_path=str(target)))
            assert not target.exists(), csi.log_text()[-3000:]
    finally:
        for pod in pods:
            pod.close()
        stop_all(csi)
        fast.close()
        slow.close()
        api.close()


@needs_fuse
def test_lazy_volume_that_cannot_be_restored_fails_loudly(node: Path, fixtures: Fixtures, registry) -> None:  # type: ignore[no-untyped-def]
    data = os.urandom(SIZE)
    fixtures.raw_model("restart/gone:v1", {"weights.safetensors": data})
    proxy = ProxyProcess(registry.host, gate=True, log=str(node / "proxy.log"))  # never opened: unfinished at the kill
    csi = plugin(node, "--metrics-address", "127.0.0.1:0")
    try:
        target = kubelet_target(node / "pods", POD_UID, "gone")
        request = inline_request("gone", target, f"{proxy.host}/restart/gone:v1", mount="lazy")
        csi.node.NodePublishVolume(request)
        helper = helper_pid(csi, target)
        csi.stop(signal.SIGKILL)
        _kill(helper)
        proxy.close()  # and the registry is gone too: the download cannot resume
        csi.start()
        wait_until(lambda: "ModelVolumeLost" in csi.log_text(), 60, "the loss to be reported")
        # kubelet cannot start a container on a missing path: the pod shows an error instead of an empty model
        assert not target.exists()
        assert code_of(csi.node.NodeGetVolumeStats, csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=request.volume_id, volume_path=str(target))) == grpc.StatusCode.NOT_FOUND
        metrics = requests.get(f"http://127.0.0.1:{_metrics_port(csi)}/metrics", timeout=5).text
        assert 'ocimodel_csi_lazy_restores_total{outcome="failed"} 1.0' in metrics
        csi.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=request.volume_id,
                                                                        target_path=str(target)))
        assert not list((csi.root / "csi" / "publications").glob("*.json"))
    finally:
        stop_all(csi)


def _metrics_port(csi: CsiProcess) -> int:
    ports = re.findall(r"metrics on port (\d+)", csi.log_text())
    assert ports, csi.log_text()[-2000:]
    return int(ports[-1])  # the running process's
