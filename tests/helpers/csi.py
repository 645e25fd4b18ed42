"""Running the real ``ocimodel csi`` server process and talking gRPC to it over a unix socket."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from csi_driver.proto import csi_pb2, csi_pb2_grpc

Mode = csi_pb2.VolumeCapability.AccessMode.Mode


class CsiProcess:
    def __init__(self, workdir: Path, *extra: str, mode: str = "all", root: Path | None = None,
                 verbose: bool = True, prefix: tuple[str, ...] = (), kubeconfig: str = "none") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.root = root or workdir / "root"
        self.socket = workdir / f"csi-{mode}.sock"
        self.log = workdir / f"csi-{mode}.log"
        self.args = [*prefix, sys.executable, "-m", "ocimodel.cli", *(["-vv"] if verbose else []), "csi",
                     "--endpoint", f"unix://{self.socket}", "--node-id", "node-a", "--mode", mode,
                     "--root", str(self.root), "--plain-http", "--kubeconfig", kubeconfig, *extra]
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(f"unix:{self.socket}")
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        deadline = time.monotonic() + 60  # a guard against a hang only: a busy machine starts Python slowly
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"csi server exited: {self.log.read_text()[-3000:]}")
            try:
                if self.identity.Probe(csi_pb2.ProbeRequest(), timeout=1).ready.value:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"csi server did not become ready: {self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.channel.close()
        self.process.send_signal(sig)
        return self.process.wait(60)  # a guard against a hang (how fast it stops: test_node_in_production)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def mount_capability(mode: int = Mode.SINGLE_NODE_READER_ONLY) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode))


def block_capability() -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(block=csi_pb2.VolumeCapability.BlockVolume(),
                                    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_READER_ONLY))


def publish_request(volume_id: str, target: Path | str, reference: str, *, readonly: bool = True,
                    capability: csi_pb2.VolumeCapability | None = None, secrets: dict[str, str] | None = None,
                    **attributes: str) -> csi_pb2.NodePublishVolumeRequest:
    context = {"reference": reference, **attributes}
    return csi_pb2.NodePublishVolumeRequest(volume_id=volume_id, target_path=str(target), readonly=readonly,
                                            volume_capability=capability or mount_capability(),
                                            volume_context=context, secrets=secrets or {})


def code_of(call, request, timeout: float = 30) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        call(request, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def publish_until_done(csi: CsiProcess, request: csi_pb2.NodePublishVolumeRequest, limit: float = 120) -> int:
    """Call NodePublishVolume like kubelet: retry on ABORTED; return how many ABORTED answers came."""
    aborted = 0
    deadline = time.monotonic() + limit
    while True:
        try:
            csi.node.NodePublishVolume(request, timeout=30)
            return aborted
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            aborted += 1
            time.sleep(0.1)


def publish_like_kubelet(csi: CsiProcess, request: csi_pb2.NodePublishVolumeRequest, limit: float = 600) -> int:
    """Call NodePublishVolume as kubelet's operation executor does: after an error, wait 0.5 s, doubling
    up to 2 min 2 s, and try again; return how many attempts failed."""
    failed, backoff = 0, 0.5
    deadline = time.monotonic() + limit
    while True:
        try:
            csi.node.NodePublishVolume(request, timeout=120)
            return failed
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            failed += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, 122.0)


def is_mounted(path: Path | str) -> bool:
    target = os.path.normpath(str(path))
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == target for line in handle)


def helper_pid(csi: CsiProcess, target: Path) -> int:
    """The pid of the FUSE helper serving lazy volume ``target`` (from the plugin's publication record)."""
    for path in (csi.root / "csi" / "publications").glob("*.json"):
        text = path.read_text()
        if f'"target_path": "{target}"' in text:
            return int(re.search(r'"helper_pid": (\d+)', text).group(1))  # type: ignore[union-attr]
    raise AssertionError(f"no record for {target}")


def unmount_all_under(path: Path) -> None:
    """Lazily unmount every mount at or below ``path``, again while any is left: a lazy server may stack the
    finished tree on its mount between a look at the mount table and the unmount, and an unmount takes off
    only the top one."""
    for _ in range(10):
        points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                  if line.split()[4] == str(path) or line.split()[4].startswith(f"{path}/")]
        if not points:
            return
        for point in reversed(points):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    raise AssertionError(f"mounts under {path} keep coming back")
