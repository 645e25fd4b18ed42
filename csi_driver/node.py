"""The CSI Node service: publish a cached model read-only at a target path, unpublish it, report stats.

Every RPC follows the same steps: validate, lock the target, check whether it is already done, act,
persist the record.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from pathlib import Path

import grpc

from csi_driver import DEFAULT_PUBLISH_WAIT
from csi_driver.attributes import (
    VolumeSpec,
    check_capability,
    credentials_from_secrets,
    parse_volume_context,
    pod_of,
    secrets_fingerprint,
)
from csi_driver.errors import CsiError, from_core, invalid
from csi_driver.events import PodEvents
from csi_driver.lazymount import detach, healthy
from csi_driver.lazyservers import ServerRunner
from csi_driver.lazyvolumes import LazyVolumes
from csi_driver.metrics import CsiMetrics
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.publications import Publication, Publications
from modelcache.errors import ModelCacheError
from modelcache.mounts import bind_mount_readonly, is_mountpoint, mount_options, mounts_at, mounts_of, unmount_all
from modelcache.records import PullResult, tree_key
from modelcache.registry.credentials import CredentialStore
from modelcache.registry.reference import Reference
from modelcache.revisions import Revisions
from modelcache.singleflight import PullFlights

log = logging.getLogger(__name__)


class _FilesFirst(Exception):
    """A lazy mount whose model must have its files verified (a signature over the files) before any is shown."""

DEADLINE_MARGIN = 5.0
DEFAULT_PUBLISH_SLOTS = 8  # publishes that may wait at once (ocimodel mount uses one)
MAX_ID_LENGTH = 4096


class NodeService(csi_pb2_grpc.NodeServicer):
    """Node RPCs. ``wait_budget`` caps how long one publish waits for a pull before answering ABORTED."""

    def __init__(self, node_id: str, pulls: PullFlights, state: Publications, *,
                 publish_wait: float = DEFAULT_PUBLISH_WAIT,
                 on_published: Callable[[Publication, VolumeSpec], None] | None = None,
                 lazy: ServerRunner | None = None, events: PodEvents | None = None,
                 metrics: CsiMetrics | None = None, publish_slots: int = DEFAULT_PUBLISH_SLOTS) -> None:
        self.node_id = node_id
        self.pulls = pulls
        self.state = state
        self.publish_wait = publish_wait
        self.on_published = on_published
        self.events = events or PodEvents(None, node_id)
        self.metrics = metrics
        self.lazy = LazyVolumes(lazy, state, pulls, self.events, metrics, mount_tree) \
            if lazy is not None and lazy.available() else None
        self.publish_slots = publish_slots
        self._slots = threading.BoundedSemaphore(publish_slots)
        self.revisions = Revisions(pulls.cache.store.root)

    # -- publish ---------------------------------------------------------------------------------------
    def publish(self, request: csi_pb2.NodePublishVolumeRequest, time_remaining: float | None = None) -> None:
        """NodePublishVolume without the gRPC plumbing (``ocimodel mount`` calls it directly)."""
        volume_id, target = request.volume_id, request.target_path
        if not volume_id or len(volume_id) > MAX_ID_LENGTH:
            raise invalid("volume_id is required")
        if not target:
            raise invalid("target_path is required")
        if not os.path.isabs(target):
            raise invalid(f"target_path {target!r} must be absolute")
        if not request.HasField("volume_capability"):
            raise invalid("volume_capability is required")
        check_capability(request.volume_capability)
        spec = parse_volume_context(request.volume_context, lazy_supported=self.lazy is not None)
        credentials = credentials_from_secrets(request.secrets, spec.reference.endpoint_host)
        target = os.path.normpath(target)
        with self.state.locked(target):
            existing = self._already_published(target, request, spec)
            if existing:
                return
            wait = self.publish_wait
            if time_remaining is not None:
                wait = min(wait, max(time_remaining - DEADLINE_MARGIN, 0.5))
            try:
                result = None
                source = self._source(spec)
                if spec.mount == "lazy":
                    try:
                        result = self._lazy_or_cached(request, spec, credentials, target, source)
                    except _FilesFirst:  # signed over its files: verified whole, then bind-mounted
                        result = self._pull(request, spec, credentials, wait, source)
                    if result is None:
                        return
                else:
                    result = self._pull(request, spec, credentials, wait, source)
                self._mount_and_record(request, spec, target, result)
            except ModelCacheError as exc:
                raise from_core(exc, f"volume {volume_id}: {spec.reference}") from None

    def _source(self, spec: VolumeSpec) -> Reference:
        """What to pull for ``spec``: a tag that a ModelCache covers on this node (resolved within its
        maxStalenessSeconds) is pinned to the node's current revision with no registry round trip, unless the
        volume asks for ``resolve: registry``; the pinned digest still passes the signature policy and, for a
        private model, the access check."""
        if spec.reference.digest is not None:
            return spec.reference
        covered = self.revisions.serving(spec.reference) if spec.resolve == "auto" else None
        if self.metrics is not None:
            self.metrics.tag_resolutions.labels(source="modelcache" if covered else "registry").inc()
        if covered is None:
            return spec.reference
        log.info("%s is %s on this node (a ModelCache's current revision); no registry round trip", spec.reference,
                 covered.digest)
        return covered

    @contextlib.contextmanager
    def _waiting_slot(self, what: str) -> Iterator[None]:
        """Hold one of the few slots in which a publish may wait (for a pull, a registry, a helper), so
        that RPC threads stay free for Probe and the other quick RPCs; none free: ABORTED at once."""
        if not self._slots.acquire(blocking=False):
            raise CsiError(grpc.StatusCode.ABORTED, f"{what}; {self.publish_slots} publishes are already waiting "
                                                    f"on this node, retrying later joins the same pull")
        try:
            yield
        finally:
            self._slots.release()

    def _mount_and_record(self, request: csi_pb2.NodePublishVolumeRequest, spec: VolumeSpec, target: str,
                          result: PullResult) -> None:
        """Record, then mount, under a lease on the tree (so eviction, gc and ``cache rm`` cannot remove it
        between the lookup and the mount). A record that cannot be written (a full disk) fails the publish
        before anything is mounted; a mount that fails takes its record away again."""
        record = result.record
        cache = self.pulls.cache
        with cache.store.lease(f"tree-{record.key}"):
            if cache.get_record(record.key) is None:
                raise CsiError(grpc.StatusCode.ABORTED, f"{record.reference} left the cache before it could be "
                                                        f"mounted; the next attempt pulls it again")
            publication = self._publication(request, spec, target, record.key, str(result.path), record.reference,
                                            record.digest, record.files, record.total_bytes)
            self.state.put(publication)
            try:
                mount_tree(result.path, target, f"{spec.reference}")
            except BaseException:
                self.state.delete(target)
                raise
        cache.touch(record.key)
        log.info("published %s (%s, %d files, %d bytes) at %s for pod %s", request.volume_id, record.reference,
                 record.files, record.total_bytes, target, publication.pod or "?")
        if self.on_published:
            self.on_published(publication, spec)

    @staticmethod
    def _publication(request: csi_pb2.NodePublishVolumeRequest, spec: VolumeSpec, target: str, key: str,
                     source: str, reference: str, digest: str, files: int, total_bytes: int) -> Publication:
        namespace, name, uid = pod_of(request.volume_context)
        return Publication(
            volume_id=request.volume_id, target_path=target, key=key, source=source, reference=reference,
            digest=digest, fingerprint=spec.fingerprint(), access_mode=request.volume_capability.access_mode.mode,
            readonly=request.readonly, mount=spec.mount, ephemeral=spec.ephemeral, files=files,
            total_bytes=total_bytes, pod=f"{namespace}/{name}" if name else "", pod_uid=uid,
            include=list(spec.options.include), exclude=list(spec.options.exclude),
            subpath=spec.options.subpath or "", layers=list(spec.options.layers), strict=spec.strict)

    def _pull(self, request: csi_pb2.NodePublishVolumeRequest, spec: VolumeSpec,
              credentials: CredentialStore | None, wait: float, source: Reference) -> PullResult:
        """Start or join the flight of ``source`` (never blocking); wait for it a bounded time in a waiting slot."""
        flight = self.pulls.start(source, spec.options, credentials, secrets_fingerprint(request.secrets))
        if flight.future.done() and not flight.future.cancelled() and flight.future.exception() is None:
            result = flight.future.result()
            if not result.record.auth_required:
                return result
        with self._waiting_slot(flight.pending()):
            try:
                result = flight.future.result(timeout=wait)
            except TimeoutError:
                raise CsiError(grpc.StatusCode.ABORTED, flight.pending()) from None
            except CancelledError:  # queued when the plugin began to shut down
                raise CsiError(grpc.StatusCode.UNAVAILABLE, "the plugin is shutting down; retry") from None
            self.pulls.check_access(result, credentials)
        return result

    def _lazy_or_cached(self, request: csi_pb2.NodePublishVolumeRequest, spec: VolumeSpec,
                        credentials: CredentialStore | None, target: str, source: Reference) -> PullResult | None:
        """For mount=lazy: a model already in the cache is bind-mounted like any other; otherwise a
        server mounts the lazy view at once and the publication is recorded here (returns None)."""
        assert self.lazy is not None
        with self._waiting_slot(f"starting a lazy mount of {spec.reference}"):
            pinned = source if source.digest else self.pulls.pin(source, spec.options, credentials)
            if self.pulls.authorize(pinned, credentials) is not None:  # before the helper shows a single file
                log.info("%s is signed over its files (OpenSSF model signing): pulled and verified whole before it "
                         "is mounted, not lazily", pinned)
                raise _FilesFirst
            hit = self.pulls.cached(pinned, spec.options)
            if hit is not None:
                self.pulls.check_access(hit, credentials)
                return hit
            assert pinned.digest is not None
            self.pulls.check_upstream(pinned, credentials)  # a mirror could serve it to anyone
            # the download starts now, here, while the server process starts: the server reads what it has
            # written (its ranged state), and the server's own download child joins it through the store's locks
            self.pulls.start(pinned, spec.options, credentials, secrets_fingerprint(request.secrets))
            publication = self._publication(request, spec, target, tree_key(pinned.digest, spec.options), "",
                                            str(pinned), str(pinned.digest), 0, 0)
            self.state.put(publication)  # first: a full disk fails here, before anything is mounted
            created = not os.path.exists(target)
            try:
                started = self.lazy.start(target, str(pinned), spec.options, credentials, spec.strict,
                                          request.volume_id)
                publication.files, publication.total_bytes = started.files, started.total_bytes
                publication.helper_pid, publication.mount_pod = started.pid, started.pod
                try:
                    self.state.put(publication)
                except BaseException:
                    detach(target, remove=created)
                    self.lazy.release(target)
                    raise
            except BaseException:
                self.state.delete(target)
                if created:
                    _remove_dir(target)
                raise
        log.info("published %s (%s, %d files, %d bytes) lazily at %s for pod %s (server %s)", request.volume_id,
                 pinned, started.files, started.total_bytes, target, publication.pod or "?",
                 started.pod or f"pid {started.pid}")
        return None

    def _already_published(self, target: str, request: csi_pb2.NodePublishVolumeRequest, spec: VolumeSpec) -> bool:
        """True when ``target`` already shows this volume with compatible arguments; ALREADY_EXISTS when it
        shows something else."""
        record = self.state.get(target)
        mounted = is_mountpoint(target)
        if record is None:
            if mounted:
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{target} is already a mount point of something this driver did not publish")
            return False
        if not mounted or not healthy(target) or record.problem:
            log.info("record for %s exists but %s; publishing again", target,
                     record.problem or ("its mount is dead" if mounted else "nothing is mounted there"))
            detach(target, remove=False)
            self.state.delete(target)
            return False
        if record.volume_id != request.volume_id:
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{target} already holds volume {record.volume_id}, not {request.volume_id}")
        if record.fingerprint != spec.fingerprint():
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{target} already holds {record.reference}, published with other volume attributes")
        if record.readonly != request.readonly:
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                           f"{target} was published with readonly={record.readonly}, not {request.readonly}")
        if record.access_mode != request.volume_capability.access_mode.mode:
            raise CsiError(grpc.StatusCode.ALREADY_EXISTS, f"{target} was published with another access mode")
        return True

    # -- unpublish -------------------------------------------------------------------------------------
    def unpublish(self, request: csi_pb2.NodeUnpublishVolumeRequest) -> None:
        """NodeUnpublishVolume: unmount and remove the target; an unknown target is already done."""
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.target_path:
            raise invalid("target_path is required")
        target = os.path.normpath(request.target_path)
        with self.state.locked(target):
            record = self.state.get(target)
            if record is not None and record.volume_id != request.volume_id:
                raise CsiError(grpc.StatusCode.NOT_FOUND,
                               f"volume {request.volume_id} is not published at {target} ({record.volume_id} is)")
            try:
                unmount_all(target)
            except OSError as exc:
                raise CsiError(grpc.StatusCode.INTERNAL, f"unmounting {target}: {exc}") from None
            if self.lazy is not None and (record is None or (record.mount == "lazy" and not record.source)):
                self.lazy.release(target)
            if record is not None or os.path.isdir(target):
                _remove_dir(target)
            self.state.delete(target)
            log.info("unpublished %s (%s) from %s", request.volume_id, record.reference if record else "no record",
                     target)

    # -- stats, info, capabilities -----------------------------------------------------------------------
    def volume_stats(self, request: csi_pb2.NodeGetVolumeStatsRequest) -> csi_pb2.NodeGetVolumeStatsResponse:
        """Bytes and inodes of the model shown at ``volume_path``."""
        if not request.volume_id:
            raise invalid("volume_id is required")
        if not request.volume_path:
            raise invalid("volume_path is required")
        path = os.path.normpath(request.volume_path)
        if not os.path.exists(path):
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume path {path} does not exist")
        record = self.state.get(path)
        if record is None or record.volume_id != request.volume_id:
            raise CsiError(grpc.StatusCode.NOT_FOUND, f"volume {request.volume_id} is not published at {path}")
        serving = healthy(path) if record.source == "" else Path(record.source).is_dir()
        ok = is_mountpoint(path) and serving and not record.problem
        usage = [
            csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.BYTES, total=record.total_bytes, used=record.total_bytes,
                                available=0),
            csi_pb2.VolumeUsage(unit=csi_pb2.VolumeUsage.INODES, total=record.files, used=record.files, available=0),
        ]
        message = "ok" if ok else (record.problem or "the model mount is gone; restart the pod to publish it again")
        condition = csi_pb2.VolumeCondition(abnormal=not ok, message=message)
        return csi_pb2.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def orphans(self) -> list[str]:
        """Mount points that show a tree of our cache but have no record (reported at start-up)."""
        known = {p.target_path for p in self.state.all()}
        return [m.mountpoint for m in mounts_of(self.pulls.cache.store.trees, inside=True)
                if m.mountpoint not in known]

    def stale_records(self) -> list[str]:
        """Records whose target is no longer mounted (reported at start-up)."""
        return [p.target_path for p in self.state.all() if not mounts_at(p.target_path)]

    # -- gRPC -------------------------------------------------------------------------------------------
    def NodePublishVolume(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """gRPC entry of :meth:`publish`."""
        remaining = context.time_remaining()
        started = time.monotonic()
        self.publish(request, remaining)
        log.debug("publish took %.1f ms", (time.monotonic() - started) * 1000)
        return csi_pb2.NodePublishVolumeResponse()

    def NodeUnpublishVolume(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """gRPC entry of :meth:`unpublish`."""
        self.unpublish(request)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def NodeGetVolumeStats(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """gRPC entry of :meth:`volume_stats`."""
        return self.volume_stats(request)

    def NodeGetCapabilities(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """GET_VOLUME_STATS and VOLUME_CONDITION."""
        rpc = csi_pb2.NodeServiceCapability.RPC
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[
            csi_pb2.NodeServiceCapability(rpc=rpc(type=rpc.GET_VOLUME_STATS)),
            csi_pb2.NodeServiceCapability(rpc=rpc(type=rpc.VOLUME_CONDITION)),
        ])

    def NodeGetInfo(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        """This node's id; no volume limit."""
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id, max_volumes_per_node=0)


def mount_tree(source: Path | str, target: str, what: str) -> None:
    """Bind ``source`` read-only at ``target`` (created if missing, removed again on failure) and check
    that the mount really is read-only, nosuid and nodev."""
    created = not os.path.exists(target)
    try:
        os.makedirs(target, exist_ok=True)
        bind_mount_readonly(source, target)
        missing = {"ro", "nosuid", "nodev"} - mount_options(target)
        if missing:
            unmount_all(target)
            raise OSError(errno.EPERM, f"the mount lacks {', '.join(sorted(missing))}")
    except OSError as exc:
        if created:
            _remove_dir(target)
        raise CsiError(grpc.StatusCode.INTERNAL, f"mounting {what} at {target}: {exc}") from None


def _remove_dir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not remove %s: %s", path, exc)
