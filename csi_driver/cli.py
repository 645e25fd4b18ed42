"""The ``ocimodel csi``, ``mount``, ``umount`` and ``fuse-serve`` subcommands: arguments here, work in
:mod:`csi_driver.commands`, imported only when one of them runs (so ``ocimodel pull`` starts fast)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from modelcache.cliopts import add_node_options

MODES = ("node", "controller", "all")


def _lazy(name: str) -> Any:
    def handler(args: argparse.Namespace) -> int:
        from csi_driver import commands
        result: int = getattr(commands, name)(args)
        return result
    return handler


def register(sub: Any) -> None:
    """Add the CSI subcommands to the ``ocimodel`` parser."""
    csi = sub.add_parser("csi", help="run the CSI plugin (gRPC on a unix socket)")
    csi.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"))
    csi.add_argument("--node-id", default=os.environ.get("NODE_ID", ""))
    csi.add_argument("--mode", choices=MODES, default="all")
    csi.add_argument("--state-dir", help="where the controller keeps its volume records (default: --root)")
    csi.add_argument("--publish-wait", type=float, default=100.0,
                     help="seconds NodePublishVolume waits for a pull before answering ABORTED (kubelet retries)")
    csi.add_argument("--fuse-launcher", default="",
                     help="unix socket of an 'ocimodel fuse-launcher' hosting lazy-mount helpers ('' = here)")
    csi.add_argument("--metrics-address", default="", help="host:port for Prometheus metrics ('' = off)")
    csi.add_argument("--kubeconfig", default="", help="kubeconfig for PVC lookups ('' = in-cluster, 'none' = off)")
    add_node_options(csi)
    csi.set_defaults(handler=_lazy("cmd_csi"), log_level=logging.INFO)

    mount = sub.add_parser("mount", help="mount a model read-only at a directory (no Kubernetes needed)")
    mount.add_argument("reference")
    mount.add_argument("target")
    mount.add_argument("--lazy", action="store_true", help="FUSE lazy mount (reads before the pull ends)")
    mount.add_argument("--include", action="append")
    mount.add_argument("--exclude", action="append")
    mount.add_argument("--path")
    mount.add_argument("--username", help="registry user (password from $OCIMODEL_PASSWORD)")
    add_node_options(mount)
    mount.set_defaults(handler=_lazy("cmd_mount"))

    helper = sub.add_parser("fuse-serve", help="(internal) serve one lazy mount; reads its job on stdin")
    helper.set_defaults(handler=_lazy("cmd_fuse_serve"))

    launcher = sub.add_parser("fuse-launcher", help="host lazy-mount helpers for the CSI driver (own container)")
    launcher.add_argument("--socket", required=True, help="unix socket path (created mode 0600)")
    launcher.set_defaults(handler=_lazy("cmd_fuse_launcher"), log_level=logging.INFO)

    umount = sub.add_parser("umount", help="unmount a model mounted with 'ocimodel mount'")
    umount.add_argument("target")
    add_node_options(umount)
    umount.set_defaults(handler=_lazy("cmd_umount"))
