"""``ocimodel mount`` and ``umount`` without Kubernetes: the Node service's own publish and unpublish
paths, driven in-process (same validation, locking, records and read-only mounts as for a pod)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

from csi_driver.attributes import parse_volume_context
from csi_driver.errors import CsiError
from csi_driver.lazyservers import ProcessRunner
from csi_driver.node import NodeService
from csi_driver.proto import csi_pb2
from csi_driver.publications import Publications
from modelcache.settings import Settings
from modelcache.singleflight import PullFlights

log = logging.getLogger(__name__)
Mode = csi_pb2.VolumeCapability.AccessMode.Mode
RETRY_PAUSE = 0.2


def _local_node(settings: Settings) -> NodeService:
    return NodeService(socket.gethostname(), PullFlights(settings, for_volumes=False), Publications(settings.root),
                       lazy=ProcessRunner(settings.root))


def local_volume_id(target: str) -> str:
    """The volume id ``ocimodel mount`` uses for ``target``."""
    return "local-" + hashlib.sha256(os.path.abspath(target).encode()).hexdigest()[:16]


def mount_model(settings: Settings, target: str, attributes: Mapping[str, str], secrets: Mapping[str, str],
                on_wait: Callable[[str], None] = log.info) -> str:
    """Publish the model ``attributes`` name (volume attributes, as for a pod) read-only at ``target``,
    waiting out background pulls (``on_wait`` hears each progress message); return the absolute target.
    Errors are :class:`CsiError`."""
    node = _local_node(settings)
    parse_volume_context(attributes, lazy_supported=True)
    target = os.path.abspath(target)
    request = csi_pb2.NodePublishVolumeRequest(
        volume_id=local_volume_id(target), target_path=target, readonly=True, volume_context=dict(attributes),
        secrets=dict(secrets),
        volume_capability=csi_pb2.VolumeCapability(
            mount=csi_pb2.VolumeCapability.MountVolume(),
            access_mode=csi_pb2.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_READER_ONLY)))
    while True:
        try:
            node.publish(request)
            return target
        except CsiError as exc:
            if exc.code.name != "ABORTED":
                raise
            on_wait(exc.message)
            time.sleep(RETRY_PAUSE)


def unmount_model(settings: Settings, target: str) -> str:
    """Unpublish what ``ocimodel mount`` published at ``target``; return the absolute target."""
    node = _local_node(settings)
    target = os.path.abspath(target)
    record = node.state.get(target)
    volume_id = record.volume_id if record else local_volume_id(target)
    node.unpublish(csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))
    return target
