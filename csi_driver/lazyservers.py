"""Where the FUSE servers of lazy volumes run, so that a volume lives as long as its pod and not as long as
the plugin: in a cluster, one *mount pod* per volume (:class:`PodRunner`); elsewhere, a detached process in
its own session found again by its state file (:class:`ProcessRunner`). Both hand the server its job
(settings, reference, credentials) over a root-only unix socket under the cache root, never in a Pod spec."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from csi_driver.lazymount import fuse_available
from modelcache.errors import Kind, ModelCacheError
from modelcache.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)
READY_TIMEOUT = 90.0
SPARE_CONNECT_SECONDS = 2.0
POLL = 0.05
MOUNT_POD_LABEL = "ocimodel.csi.dev/mount-pod"
NODE_LABEL = "ocimodel.csi.dev/node"
VOLUME_LABEL = "ocimodel.csi.dev/volume"
TARGET_ANNOTATION = "ocimodel.csi.dev/target"
MOUNT_POD_ACCOUNT = "ocimodel-mount"
KUBELET_PODS = "/var/lib/kubelet/pods"
PRIVILEGE_REASONS = {  # the deploy/ convention: every privilege of a container says why, on its pod
    "ocimodel.csi.dev/privileged-because.fuse": "a FUSE mount at kubelet's target path needs /dev/fuse and "
    "CAP_SYS_ADMIN, and its Bidirectional propagation back to the host is allowed only in privileged containers",
    "ocimodel.csi.dev/root-because.fuse": "it writes the root-owned model cache and its job socket accepts only "
    "uid 0 (the node plugin)",
}


@dataclass(frozen=True)
class Started:
    """A server that has mounted and is serving: its pid (local runner) or pod name, and what it shows."""

    pid: int
    pod: str
    files: int
    total_bytes: int


def server_key(target: str) -> str:
    """The name stem of everything that belongs to the server of ``target``."""
    return hashlib.sha256(target.encode()).hexdigest()[:16]


def job_socket(root: Path | str, target: str) -> Path:
    """The root-only socket on which the server of ``target`` waits for its job."""
    return Path(root) / "csi" / "lazy" / f"{server_key(target)}.sock"


def hand_over(path: Path, job: dict[str, Any], timeout: float, starting: Callable[[], bool]) -> str | None:
    """Send ``job`` to the server waiting on ``path`` once it listens (while ``starting()`` holds) and return
    its reply line: ``READY files bytes``, ``ERROR KIND message``, '' when it took the job but never answered,
    or None when it never took it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(max(deadline - time.monotonic(), 1.0))
                conn.connect(str(path))
                conn.sendall(json.dumps(job).encode())
                conn.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := conn.recv(4096):
                    reply += chunk
                return reply.decode(errors="replace").strip()
        except (FileNotFoundError, ConnectionRefusedError):
            if not starting():
                return None
            time.sleep(POLL)
        except OSError as exc:
            log.warning("handing the lazy job to %s failed: %s", path, exc)
            return ""
    return None


def started_from(line: str | None, what: str, log_tail: str = "") -> tuple[int, int]:
    """``(files, bytes)`` from a READY line; a ModelCacheError for anything else."""
    line = line or ""
    if line.startswith("READY"):
        _, files, total = line.split()[:3]
        return int(files), int(total)
    if line.startswith("ERROR"):
        _, kind, message = (line.split(" ", 2) + [""])[:3]
        raise ModelCacheError(message, kind=Kind[kind] if kind in Kind.__members__ else Kind.INTERNAL)
    raise ModelCacheError(f"the lazy mount server ({what}) did not start: {line or 'no answer'}; {log_tail}",
                          kind=Kind.INTERNAL)


class ServerRunner(Protocol):
    """Starts, finds and stops the FUSE servers of lazy volumes, one per target path."""

    def available(self) -> bool:
        """True when lazy volumes can be served."""

    def start(self, job: dict[str, Any], timeout: float = READY_TIMEOUT) -> Started:
        """Start the server of ``job['target']`` (replacing a stale one) and wait until it has mounted."""

    def serving(self, target: str) -> bool:
        """True when the server of ``target`` runs."""

    def running(self) -> dict[str, str]:
        """Every server found on this node (also those of an earlier plugin): target -> pid or pod name."""

    def stop(self, target: str, server: str = "") -> None:
        """End the server of ``target`` (``server``: as :meth:`running` named it) after its mount is gone, and
        forget it; never blocks long."""


class ProcessRunner:
    """Each server is ``ocimodel fuse-serve`` in a session of its own (it outlives this process); its state
    file ``<root>/csi/lazy/<key>.server.json`` finds it again. With ``spare``, one server is kept started
    ahead (imports done, waiting for a job, at the lowest CPU priority until it gets one where it may take
    this process's priority back, ending with this process if it never does): a publish hands its job to it
    and skips the Python start, which otherwise lies on the path to a pod's first read and competes with the
    download for the CPU."""

    def __init__(self, root: Path, *, spare: bool = False) -> None:
        self.dir = root / "csi" / "lazy"
        self.spare_dir = root / "csi" / "spare"
        self.root = root
        self._spare: tuple[subprocess.Popen[bytes], Path] | None = None
        self._lock = threading.Lock()
        self.keeps_spare = spare and self.available()
        if self.keeps_spare:
            self.spare_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.spare_dir.glob("*.sock"):  # an earlier plugin's: its spare ended with it
                stale.unlink(missing_ok=True)
            (self.spare_dir / "spare.log").unlink(missing_ok=True)
            self._refill()

    def available(self) -> bool:
        return fuse_available()

    def _state(self, target: str) -> Path:
        return self.dir / f"{server_key(target)}.server.json"

    def _server(self, target: str) -> int:
        """The pid of the live server of ``target`` its state file names, or 0."""
        data = read_json(self._state(target))
        if not isinstance(data, dict) or data.get("target") != target:
            return 0
        pid, path = int(data.get("pid", 0)), str(data.get("socket") or job_socket(self.root, target))
        return pid if pid and _is_server(pid, path) else 0

    def serving(self, target: str) -> bool:
        return bool(self._server(target))

    def running(self) -> dict[str, str]:
        found = {}
        for path in self.dir.glob("*.server.json"):
            data = read_json(path)
            if isinstance(data, dict) and isinstance(data.get("target"), str):
                found[data["target"]] = str(data.get("pid", 0))
        return found

    def start(self, job: dict[str, Any], timeout: float = READY_TIMEOUT) -> Started:
        target = job["target"]
        self.stop(target, wait=True)  # never two servers for one mount
        self.dir.mkdir(parents=True, exist_ok=True)
        log_path = self.dir / f"{server_key(target)}.log"
        job = {**job, "log": str(log_path)}
        spare = self._take_spare()
        line: str | None = None
        if spare is not None:
            process, path = spare
            self._record(target, process.pid, path)
            listening = time.monotonic() + SPARE_CONNECT_SECONDS  # its socket exists: it listens at once
            line = hand_over(path, {**job, "nice": os.getpriority(os.PRIO_PROCESS, 0)}, timeout,
                             lambda: process.poll() is None and time.monotonic() < listening)
            if line is None:  # it never took the job: it ends, and this volume gets a server of its own
                log.warning("the spare lazy-mount server (pid %d) did not take the job; starting one for %s",
                            process.pid, target)
                self._state(target).unlink(missing_ok=True)
                process.kill()
        if line is None:
            path = job_socket(self.root, target)
            process = _spawn(path, log_path)
            self._record(target, process.pid, path)
            line = hand_over(path, job, timeout, lambda: process.poll() is None)
        try:
            files, total = started_from(line, f"pid {process.pid}", "log: " + _tail(log_path))
        except ModelCacheError:
            self.stop(target, wait=True)
            raise
        finally:
            self._refill()
        return Started(process.pid, "", files, total)

    def _record(self, target: str, pid: int, path: Path) -> None:
        """The state file that finds the server ``pid`` of ``target`` (waiting on ``path``) again."""
        atomic_write_json(self._state(target), {"target": target, "pid": pid, "socket": str(path)})

    def _take_spare(self) -> tuple[subprocess.Popen[bytes], Path] | None:
        """The spare server when it is waiting for a job (a spare still starting stays the spare)."""
        with self._lock:
            spare = self._spare
            if spare is None or spare[0].poll() is not None or not spare[1].exists():
                return None
            self._spare = None
            return spare

    def _refill(self) -> None:
        """Start a new spare server unless one is starting or waiting; a failure (no process or file to be
        had) only means the next publish starts a server of its own."""
        if not self.keeps_spare:
            return
        with self._lock:
            if self._spare is not None and self._spare[0].poll() is None:
                return
            path = self.spare_dir / f"{secrets.token_hex(8)}.sock"
            try:
                self._spare = (_spawn(path, self.spare_dir / "spare.log", spare_of=os.getpid()), path)
            except OSError as exc:
                self._spare = None
                log.warning("could not start a spare lazy-mount server: %s", exc)

    def stop(self, target: str, server: str = "", *, wait: bool = False) -> None:
        pid = self._server(target)
        self._state(target).unlink(missing_ok=True)
        job_socket(self.root, target).unlink(missing_ok=True)
        if not pid:
            return
        command = _command_line(pid)

        def end() -> None:
            deadline = time.monotonic() + 10
            while _command_line(pid) == command and time.monotonic() < deadline:
                time.sleep(POLL)
            if _command_line(pid) == command:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

        if wait:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            end()
        else:
            threading.Thread(target=end, name=f"stop-{pid}", daemon=True).start()


def _spawn(path: Path, log_path: Path, *, spare_of: int = 0) -> subprocess.Popen[bytes]:
    """Start ``ocimodel fuse-serve`` waiting for its job on ``path``, in a session of its own; a spare of the
    process ``spare_of`` (see :mod:`csi_driver.priority`)."""
    command = [sys.executable, "-m", "ocimodel.cli", "fuse-serve", "--socket", str(path),
               *(["--spare-of", str(spare_of)] if spare_of else [])]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                   start_new_session=True)
    threading.Thread(target=process.wait, name=f"reap-{process.pid}", daemon=True).start()
    return process


def _tail(log_path: Path) -> str:
    """The end of a server's log ('' when it has none yet)."""
    try:
        return log_path.read_text(errors="replace")[-800:]
    except OSError:
        return ""


def _command_line(pid: int) -> list[bytes]:
    """The command line of the live process ``pid``; [] when there is none (or only its zombie)."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return []
    return [] if state == "Z" else command


def _is_server(pid: int, socket_path: str) -> bool:
    """``pid`` is a live server waiting or serving on ``socket_path`` (the number may have been reused)."""
    command = _command_line(pid)
    return b"fuse-serve" in command and socket_path.encode() in command


class PodApi(Protocol):
    """The Kubernetes calls of :class:`PodRunner` (kubeadapter.client.KubeClient has them)."""

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    def create_pod(self, namespace: str, body: dict[str, Any]) -> bool: ...
    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]: ...
    def delete_pod(self, namespace: str, name: str) -> None: ...


def mount_pod_name(node: str, target: str) -> str:
    """The mount pod of ``target`` on ``node`` (deterministic: a second create answers 409)."""
    digest = hashlib.sha256((node + "\n" + target).encode()).hexdigest()
    return f"ocimodel-mount-{digest[:20]}"


def _label_value(text: str) -> str:
    """``text`` as a label value (at most 63 characters; longer ones shortened with a hash)."""
    if len(text) <= 63 and text.replace("-", "").replace(".", "").replace("_", "").isalnum():
        return text
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def _phase(pod: dict[str, Any]) -> str:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return "Terminating"
    return str(pod.get("status", {}).get("phase") or "Pending")


class PodRunner:
    """Each server runs in a mount pod on this node, in the plugin's namespace, from the plugin's own image."""

    def __init__(self, api: PodApi, namespace: str, pod_name: str, node: str, root: Path) -> None:
        self.api, self.namespace, self.pod_name, self.node, self.root = api, namespace, pod_name, node, root
        self._own: dict[str, Any] | None = None

    def available(self) -> bool:
        return True  # the mount pod brings /dev/fuse and the privileges; the plugin needs neither

    def name(self, target: str) -> str:
        """The mount pod of ``target`` on this node."""
        return mount_pod_name(self.node, target)

    def own_pod(self) -> dict[str, Any]:
        """The plugin's own Pod (read once): its image and host paths are the mount pods'."""
        if self._own is None:
            pod = self.api.get_pod(self.namespace, self.pod_name)
            if pod is None:
                raise ModelCacheError(f"the plugin's own pod {self.namespace}/{self.pod_name} was not found",
                                      kind=Kind.NOT_FOUND)
            self._own = pod
        return self._own

    def pod_spec(self, target: str, volume_id: str) -> dict[str, Any]:
        """The mount pod of ``target``: privileged only for FUSE (and the Bidirectional propagation kubelet
        allows only there), no service-account token, the job socket as its only argument."""
        own = self.own_pod()["spec"]
        container = next((c for c in own["containers"] if c["name"] == "ocimodel-csi"), own["containers"][0])
        mount_paths = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
        hosts = {v["name"]: v["hostPath"]["path"] for v in own.get("volumes", []) if "hostPath" in v}
        cache_volume = next((n for n, p in mount_paths.items() if p.rstrip("/") == str(self.root).rstrip("/")), "")
        pods_volume = next((n for n, p in mount_paths.items() if p.rstrip("/") == KUBELET_PODS), "")
        if cache_volume not in hosts or pods_volume not in hosts:
            raise ModelCacheError(f"the plugin's pod mounts no hostPath at {self.root} and {KUBELET_PODS}",
                                  kind=Kind.INVALID_ARGUMENT)
        spec: dict[str, Any] = {
            "nodeName": self.node, "restartPolicy": "Never", "priorityClassName": "system-node-critical",
            "serviceAccountName": MOUNT_POD_ACCOUNT, "automountServiceAccountToken": False,
            "enableServiceLinks": False, "terminationGracePeriodSeconds": 30,
            "tolerations": [{"operator": "Exists"}],  # it must stay with the volume whatever taints come
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "fuse", "image": container["image"],
                "args": ["fuse-serve", "--socket", str(job_socket(self.root, target))],
                "securityContext": {"privileged": True, "readOnlyRootFilesystem": True},
                "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
                "volumeMounts": [
                    {"name": "kubelet-pods", "mountPath": KUBELET_PODS, "mountPropagation": "Bidirectional"},
                    {"name": "cache", "mountPath": str(self.root), "mountPropagation": "HostToContainer"},
                    {"name": "dev-fuse", "mountPath": "/dev/fuse"},
                    {"name": "tmp", "mountPath": "/tmp"}]}],
            "volumes": [
                {"name": "kubelet-pods", "hostPath": {"path": hosts[pods_volume], "type": "Directory"}},
                {"name": "cache", "hostPath": {"path": hosts[cache_volume], "type": "Directory"}},
                {"name": "dev-fuse", "hostPath": {"path": "/dev/fuse", "type": "CharDevice"}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
        }
        if own.get("imagePullSecrets"):
            spec["imagePullSecrets"] = own["imagePullSecrets"]
        return {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": self.name(target), "namespace": self.namespace,
                             "labels": {"app.kubernetes.io/name": "ocimodel-mount", MOUNT_POD_LABEL: "true",
                                        NODE_LABEL: _label_value(self.node), VOLUME_LABEL: _label_value(volume_id)},
                             "annotations": {TARGET_ANNOTATION: target, **PRIVILEGE_REASONS}},
                "spec": spec}

    def start(self, job: dict[str, Any], timeout: float = READY_TIMEOUT) -> Started:
        target, name = job["target"], self.name(job["target"])
        body = self.pod_spec(target, str(job.get("volume_id", "")))
        if not self.api.create_pod(self.namespace, body):  # 409: a pod of this target exists
            existing = self.api.get_pod(self.namespace, name)
            if existing is not None and _phase(existing) not in ("Pending", "Running"):
                self._delete_and_wait(name, timeout)  # a finished server: replace it
                self.api.create_pod(self.namespace, body)
            else:
                log.info("mount pod %s exists already: handing it the job", name)

        def starting() -> bool:
            pod = self.api.get_pod(self.namespace, name)
            return pod is not None and _phase(pod) in ("Pending", "Running")

        line = hand_over(job_socket(self.root, target), job, timeout, _every(0.5, starting))
        try:
            files, total = started_from(line, f"mount pod {self.namespace}/{name}",
                                        f"see kubectl logs -n {self.namespace} {name}")
        except ModelCacheError:
            self.api.delete_pod(self.namespace, name)
            raise
        log.info("mount pod %s serves %s", name, target)
        return Started(0, name, files, total)

    def _delete_and_wait(self, name: str, timeout: float) -> None:
        self.api.delete_pod(self.namespace, name)
        deadline = time.monotonic() + timeout
        while self.api.get_pod(self.namespace, name) is not None:
            if time.monotonic() > deadline:
                raise ModelCacheError(f"mount pod {name} is still being deleted; retry", kind=Kind.UNAVAILABLE)
            time.sleep(0.2)

    def serving(self, target: str) -> bool:
        pod = self.api.get_pod(self.namespace, self.name(target))
        return pod is not None and _phase(pod) in ("Pending", "Running")

    def running(self) -> dict[str, str]:
        selector = f"{MOUNT_POD_LABEL}=true,{NODE_LABEL}={_label_value(self.node)}"
        found = {}
        for pod in self.api.list_pods(self.namespace, selector):
            target = (pod["metadata"].get("annotations") or {}).get(TARGET_ANNOTATION)
            if target:
                found[target] = pod["metadata"]["name"]
        return found

    def stop(self, target: str, server: str = "") -> None:
        self.api.delete_pod(self.namespace, server or self.name(target))


def _every(seconds: float, check: Callable[[], bool]) -> Callable[[], bool]:
    """``check``, asked at most once per ``seconds`` (the last answer in between)."""
    last = [0.0, True]

    def ask() -> bool:
        if time.monotonic() - float(last[0]) >= seconds:
            last[:] = [time.monotonic(), check()]
        return bool(last[1])
    return ask
