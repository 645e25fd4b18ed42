"""The CSI Identity service: name, version, capabilities (the same in every mode) and readiness."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from csi_driver import DRIVER_NAME
from csi_driver.errors import CsiError
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from modelcache import __version__


class IdentityService(csi_pb2_grpc.IdentityServicer):
    """Identity RPCs. ``ready`` is set once start-up (store check, orphan scan) has finished.

    Probe checks only what the running mode needs: ``state_dirs`` (the node's cache root, the
    controller's state directory) must be writable directories, and a node plugin must be able to mount.
    """

    def __init__(self, state_dirs: Sequence[Path], *, needs_mounts: bool) -> None:
        self.state_dirs = tuple(state_dirs)
        self.needs_mounts = needs_mounts
        self.ready = threading.Event()

    def GetPluginInfo(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """Name and version."""
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=__version__)

    def GetPluginCapabilities(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """CONTROLLER_SERVICE, whatever this instance serves (the spec wants one answer everywhere)."""
        service = csi_pb2.PluginCapability.Service
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[
            csi_pb2.PluginCapability(service=service(type=service.CONTROLLER_SERVICE))])

    def probe(self) -> bool:
        """Ready when start-up finished and the store is usable; FAILED_PRECONDITION for a missing dependency."""
        if self.needs_mounts:
            if os.geteuid() != 0:
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, "the node plugin must run as root to mount")
            if not os.path.exists("/proc/self/mountinfo"):
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, "/proc/self/mountinfo is not readable")
        if not self.ready.is_set():
            return False
        for directory in self.state_dirs:
            if not (directory.is_dir() and os.access(directory, os.W_OK)):
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, f"{directory} is not a writable directory")
        return True

    def Probe(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """gRPC entry of :meth:`probe`."""
        return csi_pb2.ProbeResponse(ready=BoolValue(value=self.probe()))
