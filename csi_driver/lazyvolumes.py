"""The plugin's side of lazy volumes: starting their servers, adopting the servers an earlier plugin started,
cleaning up orphans, restoring volumes whose server is gone, ending servers at unpublish, and turning what
servers report (a model that failed verification) into Events and metrics."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from csi_driver.errors import CsiError
from csi_driver.events import PodEvents
from csi_driver.lazymount import FUSE_TYPE, detach, healthy, read_verdict, stale_fuse_mounts, verdict_path
from csi_driver.lazyservers import READY_TIMEOUT, ServerRunner, Started
from csi_driver.metrics import CsiMetrics
from csi_driver.publications import Publication, Publications
from modelcache.assemble.options import PullOptions
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.mounts import is_mountpoint, mounts_at, mounts_of
from modelcache.registry.credentials import CredentialStore
from modelcache.registry.reference import parse_reference
from modelcache.singleflight import PullFlights

log = logging.getLogger(__name__)
MountTree = Callable[[Path | str, str, str], None]


class LazyVolumes:
    """Lazy volumes of one node, whose servers a :class:`ServerRunner` runs."""

    def __init__(self, runner: ServerRunner, state: Publications, pulls: PullFlights, events: PodEvents,
                 metrics: CsiMetrics | None, mount_tree: MountTree) -> None:
        self.runner, self.state, self.pulls, self.events, self.metrics = runner, state, pulls, events, metrics
        self.mount_tree = mount_tree

    def start(self, target: str, reference: str, options: PullOptions, credentials: CredentialStore | None,
              strict: bool, volume_id: str = "", timeout: float = READY_TIMEOUT, published_at: float = 0.0) -> Started:
        """Start the server of ``target`` (published at ``published_at``, default now) and wait until it has
        mounted. The server is lent node-wide credentials only for ``nodeCredentialRegistries`` unless this is
        ``ocimodel mount``."""
        root = self.pulls.settings.root
        docker_config = credentials.to_docker_config() if credentials else {"auths": {}}
        self.state.put_credentials(target, docker_config)  # for a restore after the server is gone
        job = {"target": target, "volume_id": volume_id, "reference": reference,
               "settings": self.pulls.settings.to_mapping(), "docker_config": docker_config,
               "for_volume": self.pulls.for_volumes, "include": list(options.include),
               "exclude": list(options.exclude), "path": options.subpath, "layers": list(options.layers),
               "strict": strict, "published_at": published_at or time.time(),
               "verdict": str(verdict_path(root, target))}
        verdict_path(root, target).unlink(missing_ok=True)
        return self.runner.start(job, timeout)

    def release(self, target: str, server: str = "") -> None:
        """After ``target`` is unmounted: end its server and forget its verdict."""
        self.runner.stop(target, server)
        verdict_path(self.pulls.settings.root, target).unlink(missing_ok=True)

    # -- start-up: adopt, clean up, restore -------------------------------------------------------------
    def adopt(self) -> list[Publication]:
        """At start-up: adopt every lazy volume whose server still serves its mount; end the servers of
        volumes unpublished while no plugin ran (their target is no longer mounted, or they have no record);
        return the volumes whose server is gone but whose target is still mounted, for :meth:`restore`."""
        try:
            servers = self.runner.running()
        except ModelCacheError as exc:
            log.warning("cannot list lazy-mount servers (%s): orphans are cleaned up at the next start", exc)
            servers = {}
        known, lost = set(), []
        for publication in self.state.all():
            if publication.mount != "lazy" or publication.source:
                continue
            target = publication.target_path
            known.add(target)
            if not is_mountpoint(target):
                log.warning("lazy volume %s at %s was unmounted while no plugin ran: forgetting it and ending "
                            "its server", publication.volume_id, target)
                self.release(target)
                self.state.delete(target)
                with contextlib.suppress(OSError):
                    Path(target).rmdir()
                continue
            if healthy(target) and self._serving(target):
                log.info("adopted lazy volume %s at %s (server %s)", publication.volume_id, target,
                         publication.mount_pod or publication.helper_pid)
                self._count("adopted")
            else:
                lost.append(publication)
        for target, server in servers.items():
            if target not in known:
                log.warning("lazy-mount server %s serves %s, which has no record (unpublished while no plugin "
                            "ran): unmounting it and ending the server", server, target)
                detach(target)
                self.release(target, server)
        for target in stale_fuse_mounts(known):
            log.warning("stale FUSE mount at %s (transport endpoint not connected) has no record; unmounting it",
                        target)
            detach(target)
        return lost

    def _serving(self, target: str) -> bool:
        """Whether the server of ``target`` runs; when that cannot be known, assume it does (never start a
        second server for one mount)."""
        try:
            return self.runner.serving(target)
        except ModelCacheError as exc:
            log.warning("cannot tell whether the server of %s runs (%s): assuming it does", target, exc)
            return True

    def restore(self, publication: Publication) -> None:
        """Give a lazy volume whose server is gone (a node reboot, a deleted mount pod) a working mount again,
        so that what kubelet hands to a (re)started container is the model: the finished tree when the pull
        had completed, else a new server that resumes the download. When neither works, the target is
        removed so that starting a container on it fails loudly, and the volume reports an abnormal
        condition. Every case is logged, counted and told to the pod."""
        target = publication.target_path
        what = f"lazy volume {publication.volume_id} ({publication.reference}) at {target}"
        try:
            with self.state.locked(target):
                outcome = self._restore(publication)
        except (CsiError, ModelCacheError, OSError) as exc:
            outcome = "failed"
            publication.helper_pid, publication.mount_pod = 0, ""
            publication.problem = f"the lazy mount's server is gone and it could not be restored: {exc}"
            with contextlib.suppress(OSError):
                detach(target)
            self.state.put(publication)
            self.events.warn(publication.pod_ref(), "ModelVolumeLost",
                             f"{what}: {publication.problem}; restart the pod to publish it again")
        else:
            notes = {
                "bind": "the download had finished: the cached model is now bind-mounted there",
                "helper": "a new server serves it and resumes the download",
            }
            self.events.warn(publication.pod_ref(), "ModelVolumeRestored",
                             f"{what}: its FUSE server had ended; {notes[outcome]}. A container that opened the "
                             f"volume before then may see 'transport endpoint is not connected' until it "
                             f"restarts (mountPropagation: HostToContainer avoids this)")
        self._count(outcome)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.lazy_restores.labels(outcome=outcome).inc()

    def _restore(self, publication: Publication) -> str:
        target = publication.target_path
        reference = parse_reference(publication.reference)
        credentials = self._kept_credentials(target)
        if self.pulls.authorize(reference, credentials) is not None:  # the policy (changed?) wants the files signed
            raise ModelCacheError(f"{reference} is signed over its files: it is verified whole when it is "
                                  f"published again, never served lazily", kind=Kind.REFUSED)
        hit = self.pulls.cached(reference, publication.options())
        if hit is not None:
            top = mounts_at(target)[-1:] if healthy(target) else []
            shows_tree = bool(top) and top[0].fstype != FUSE_TYPE and \
                top[0].mountpoint in {m.mountpoint for m in mounts_of(hit.path)}
            if not shows_tree:
                detach(target, remove=False)
                self.mount_tree(hit.path, target, publication.reference)
            self.runner.stop(target)
            publication.source, publication.helper_pid, publication.mount_pod = str(hit.path), 0, ""
            publication.problem = ""
            self.state.put(publication)
            return "bind"
        if not self.runner.available():
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION, "FUSE lazy mounts are not available on this node")
        detach(target, remove=False)
        started = self.start(target, publication.reference, publication.options(), credentials, publication.strict,
                             publication.volume_id, published_at=publication.published_at)
        publication.helper_pid, publication.mount_pod, publication.problem = started.pid, started.pod, ""
        self.state.put(publication)
        return "helper"

    def _kept_credentials(self, target: str) -> CredentialStore | None:
        """The volume's own credentials (its ``nodePublishSecretRef``) kept at publish, or None."""
        kept = self.state.credentials(target)
        if kept is None:
            return None
        store = CredentialStore()
        store.add_docker_config(kept, source="the lazy volume's kept credentials")
        return store

    # -- what servers report ------------------------------------------------------------------------------
    def _served_verdict(self, publication: Publication) -> str | None:
        """Why bytes the volume's model served before it was verified were wrong, as its committer found
        (also when no server of the volume runs any more: a restore bound the finished tree)."""
        cache = self.pulls.cache
        record = cache.get_record(publication.key)
        for blob in record.blobs if record is not None else []:
            reason = cache.store.served.verdict_since(Digest.parse(blob), publication.published_at)
            if reason is not None:
                return reason
        return None

    def check_verdicts(self) -> None:
        """Turn what servers reported (a model that failed verification after it served reads) into an
        abnormal volume, a pod Event, a metric and an error log line, once per volume."""
        for publication in self.state.all():
            if publication.mount != "lazy" or publication.problem:
                continue
            reason = read_verdict(verdict_path(self.pulls.settings.root, publication.target_path)) or \
                self._served_verdict(publication)
            if reason is None:
                continue
            publication.problem = f"the model failed verification and every read fails: {reason}"
            with contextlib.suppress(ModelCacheError):
                self.state.put(publication)
            log.error("lazy volume %s at %s: %s", publication.volume_id, publication.target_path, publication.problem)
            self.events.warn(publication.pod_ref(), "ModelIntegrityFailure",
                             f"volume {publication.volume_id} ({publication.reference}): {publication.problem}. "
                             f"Restart the pod to mount the verified model")
            if self.metrics is not None:
                self.metrics.integrity_failures.inc()
