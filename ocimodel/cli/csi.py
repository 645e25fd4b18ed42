"""``ocimodel csi``, ``mount``, ``umount``, ``fuse-serve`` and ``fuse-pull``. The CSI
driver is imported only when one of them runs, so ``ocimodel pull`` starts fast."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from csi_driver import DEFAULT_PUBLISH_WAIT, MODES
from ocimodel.cli.options import (
    add_node_options,
    add_policy_options,
    add_selection_options,
    exit_now,
    settings_from_args,
)


def cmd_csi(args: argparse.Namespace) -> int:
    """Run the CSI plugin until SIGTERM."""
    from csi_driver.server import PluginConfig, run_plugin
    config = PluginConfig(endpoint=args.endpoint, node_id=args.node_id, mode=args.mode,
                          state_dir=Path(args.state_dir) if args.state_dir else None, publish_wait=args.publish_wait,
                          metrics_address=args.metrics_address, kubeconfig=args.kubeconfig,
                          pod_name=args.pod_name, pod_namespace=args.pod_namespace)
    run_plugin(settings_from_args(args), config)
    exit_now(0)
    return 0


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount REF read-only at TARGET through the Node service's publish path."""
    from csi_driver.localmount import mount_model
    attributes = {"reference": args.reference, "mount": "lazy" if args.lazy else "bind"}
    if args.lazy_verify:
        if not args.lazy:
            print("ocimodel: --lazy-verify needs --lazy", file=sys.stderr)
            return 2
        attributes["lazyVerify"] = args.lazy_verify
    if args.include:
        attributes["include"] = ",".join(args.include)
    if args.exclude:
        attributes["exclude"] = ",".join(args.exclude)
    if args.path:
        attributes["path"] = args.path
    if args.layers:
        attributes["layers"] = args.layers
    secrets: dict[str, str] = {}
    if args.username:
        secrets = {"username": args.username, "password": os.environ.get("OCIMODEL_PASSWORD", "")}
    with _csi_errors():
        target = mount_model(settings_from_args(args), args.target, attributes, secrets,
                             on_wait=lambda message: print(message, file=sys.stderr))
        print(f"mounted {args.reference} at {target}")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount TARGET through the Node service's unpublish path."""
    from csi_driver.localmount import unmount_model
    with _csi_errors():
        print(f"unmounted {unmount_model(settings_from_args(args), args.target)}")
    return 0


@contextmanager
def _csi_errors() -> Iterator[None]:
    """Turn a CSI error of the local mount path into one line on stderr and exit status 1."""
    from csi_driver.errors import CsiError
    try:
        yield
    except CsiError as exc:
        print(f"ocimodel: {exc.code.name}: {exc.message}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_fuse_serve(args: argparse.Namespace) -> int:
    """The server of one lazy mount (in a mount pod or a session of its own); its job arrives on --socket."""
    if args.spare_of:
        from csi_driver.priority import wait_as_spare
        wait_as_spare()  # before the imports below: they are most of a spare's start
    from csi_driver.lazyfs import helper_main
    return helper_main(Path(args.socket), args.spare_of)


def cmd_fuse_pull(args: argparse.Namespace) -> int:
    """The child of a lazy-mount server that downloads the model (its job arrives as JSON on stdin)."""
    from csi_driver.lazyfs import pull_main
    return pull_main()


def register(sub: Any) -> None:
    """Add the CSI subcommands."""
    csi = sub.add_parser("csi", help="run the CSI plugin (gRPC on a unix socket)")
    csi.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"),
                     help="where to serve gRPC: unix:///path (kubelet's plugin socket) or tcp://host:port "
                          "(default: %(default)s; $CSI_ENDPOINT when set)")
    csi.add_argument("--node-id", default=os.environ.get("NODE_ID", ""),
                     help="the node ID reported to Kubernetes, the Node object's name (default: $NODE_ID, else the "
                          "host name)")
    csi.add_argument("--mode", choices=MODES, default="all",
                     help="which CSI services to serve: node (the DaemonSet), controller (the provisioner's pod) or "
                          "all (default: %(default)s)")
    csi.add_argument("--state-dir", help="where the controller keeps its volume records (default: --root)")
    csi.add_argument("--publish-wait", type=float, default=DEFAULT_PUBLISH_WAIT,
                     help="seconds NodePublishVolume waits for a pull before answering ABORTED (kubelet retries; "
                          "default: %(default)s)")
    csi.add_argument("--pod-name", default=os.environ.get("POD_NAME", ""),
                     help="the plugin's own pod (default $POD_NAME): with it, lazy volumes are served by mount pods "
                          "from the pod's image; without, by processes in sessions of their own")
    csi.add_argument("--pod-namespace", default=os.environ.get("POD_NAMESPACE", ""),
                     help="the namespace of --pod-name and of the mount pods (default $POD_NAMESPACE)")
    csi.add_argument("--metrics-address", default="",
                     help="host:port to serve Prometheus metrics on (default: off; a host of '' is 127.0.0.1)")
    csi.add_argument("--kubeconfig", default="", help="kubeconfig for PVC lookups, pod events and mount pods "
                     "(default: in-cluster, if there is a cluster; 'none' = off)")
    add_node_options(csi)
    csi.set_defaults(handler=cmd_csi, log_level=logging.INFO)

    mount = sub.add_parser("mount", help="mount a model read-only at a directory (no Kubernetes needed)")
    mount.add_argument("reference", help="the model: registry/repository[:tag][@digest]")
    mount.add_argument("target", help="the directory to mount it on")
    mount.add_argument("--lazy", action="store_true", help="FUSE lazy mount (reads before the pull ends)")
    mount.add_argument("--lazy-verify", choices=("background", "strict"),
                       help="background (default): serve chunks while the pull verifies the blobs; strict: serve a "
                            "file only once its blob is verified (the lazyVerify volume attribute)")
    add_selection_options(mount, path_help="mount this sub-directory of the model")
    mount.add_argument("--username", help="registry user, as a volume's pull secret (password from "
                                          "$OCIMODEL_PASSWORD; default: anonymous, plus the node's credentials "
                                          "where nodeCredentialRegistries lends them)")
    add_node_options(mount)
    add_policy_options(mount)
    mount.set_defaults(handler=cmd_mount)

    helper = sub.add_parser("fuse-serve", help="(internal) serve one lazy mount; its job arrives on --socket")
    helper.add_argument("--socket", required=True, help="root-only unix socket to wait on for the job")
    helper.add_argument("--spare-of", type=int, default=0, metavar="PID",
                        help="a spare server of plugin PID: wait while PID runs, then take up the job "
                             "(default: not a spare)")
    helper.set_defaults(handler=cmd_fuse_serve, log_level=logging.INFO)
    pull = sub.add_parser("fuse-pull", help="(internal) download a lazy mount's model; reads its job on stdin")
    pull.set_defaults(handler=cmd_fuse_pull, log_level=logging.INFO)

    umount = sub.add_parser("umount", help="unmount a model mounted with 'ocimodel mount'")
    umount.add_argument("target", help="the directory a model was mounted on")
    add_node_options(umount)
    umount.set_defaults(handler=cmd_umount)
