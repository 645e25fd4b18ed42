"""What ``ocimodel csi``, ``mount``, ``umount`` and ``fuse-serve`` do (imported only when one of them runs)."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import socket
import sys
import time
from pathlib import Path

from csi_driver.attributes import parse_volume_context
from csi_driver.errors import CsiError
from csi_driver.lazymount import LazyLauncher
from csi_driver.node import NodeService
from csi_driver.proto import csi_pb2
from csi_driver.pulls import PullManager
from csi_driver.server import build_driver, serve_forever
from csi_driver.volumes import VolumeState
from modelcache.cliopts import settings_from_args
from modelcache.errors import ModelCacheError

Mode = csi_pb2.VolumeCapability.AccessMode.Mode


def cmd_csi(args: argparse.Namespace) -> int:
    """Run the CSI plugin until SIGTERM."""
    settings = settings_from_args(args)
    pvc_lookup = create_event = None
    if args.kubeconfig != "none":
        from kubeadapter.client import KubeClient
        try:
            kube = KubeClient.connect(args.kubeconfig or None)
        except ModelCacheError as exc:
            if args.kubeconfig:  # asked for explicitly: a broken kubeconfig is an error
                raise SystemExit(f"ocimodel csi: {exc}") from None
            logging.getLogger(__name__).warning(
                "no Kubernetes API access (%s): running without PVC annotation lookups and pod events; "
                "pass --kubeconfig=none to silence this", exc)
        else:
            pvc_lookup, create_event = kube.pvc_annotation, kube.create_event
    driver = build_driver(settings, endpoint=args.endpoint, node_id=args.node_id or socket.gethostname(),
                          mode=args.mode, state_dir=Path(args.state_dir) if args.state_dir else None,
                          publish_wait=args.publish_wait, pvc_annotation=pvc_lookup, create_event=create_event,
                          metrics_address=args.metrics_address, fuse_launcher=args.fuse_launcher)
    serve_forever(driver)
    return 0


def _local_node(args: argparse.Namespace) -> NodeService:
    settings = settings_from_args(args)
    return NodeService(socket.gethostname(), PullManager(settings), VolumeState(settings.root),
                       lazy=LazyLauncher(settings))


def cmd_fuse_launcher(args: argparse.Namespace) -> int:
    """Host lazy-mount helpers until SIGTERM."""
    from csi_driver.lazymount import serve_launcher
    serve_launcher(Path(args.socket))
    return 0


def cmd_fuse_serve(args: argparse.Namespace) -> int:
    """The detached helper that serves one lazy mount (started by the Node service)."""
    from csi_driver.lazyfs import helper_main
    return helper_main()


def _volume_id(target: str) -> str:
    return "local-" + hashlib.sha256(os.path.abspath(target).encode()).hexdigest()[:16]


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount REF read-only at TARGET through the Node service's publish path."""
    node = _local_node(args)
    context = {"reference": args.reference, "mount": "lazy" if args.lazy else "bind"}
    if args.include:
        context["include"] = ",".join(args.include)
    if args.exclude:
        context["exclude"] = ",".join(args.exclude)
    if args.path:
        context["path"] = args.path
    parse_volume_context(context, lazy_supported=True)
    secrets: dict[str, str] = {}
    if args.username:
        secrets = {"username": args.username, "password": os.environ.get("OCIMODEL_PASSWORD", "")}
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=_volume_id(args.target), target_path=os.path.abspath(args.target), readonly=True,
        volume_context=context, secrets=secrets,
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_READER_ONLY)))
    while True:
        try:
            node.publish(request)
            break
        except CsiError as exc:
            if exc.code.name != "ABORTED":
                print(f"ocimodel: {exc.code.name}: {exc.message}", file=sys.stderr)
                return 1
            print(exc.message, file=sys.stderr)
            time.sleep(0.2)
    print(f"mounted {args.reference} at {os.path.abspath(args.target)}")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    """Unmount TARGET through the Node service's unpublish path."""
    node = _local_node(args)
    target = os.path.abspath(args.target)
    record = node.state.get(target)
    volume_id = record.volume_id if record else _volume_id(target)
    try:
        node.unpublish(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    except CsiError as exc:
        print(f"ocimodel: {exc.code.name}: {exc.message}", file=sys.stderr)
        return 1
    print(f"unmounted {target}")
    return 0
