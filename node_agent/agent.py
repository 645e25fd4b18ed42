"""The node agent: one trio process per node. Services run in one nursery; blocking work (pulls,
Kubernetes calls, page-cache scans) runs in worker threads behind capacity limiters."""

from __future__ import annotations

import datetime
import logging
import math
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client import start_http_server

from kubeadapter.client import KubeClient
from modelcache import pagecache
from modelcache.cache import ModelCache
from modelcache.credentials import CredentialStore
from modelcache.errors import Kind, ModelCacheError
from modelcache.eviction import evict
from modelcache.gc import usage
from modelcache.mounts import mounts_of
from modelcache.options import PullOptions
from modelcache.pins import Pins
from modelcache.progress import Progress
from modelcache.records import PullResult
from modelcache.settings import Settings
from modelcache.singleflight import PullFlights
from modelcache.verify import verify_cache
from modelcache.warmrequests import WarmRequests
from node_agent import GROUP, KIND, PLURAL, VERSION
from node_agent.metrics import AgentMetrics
from node_agent.spec import ModelCacheSpec, node_label, parse_spec

log = logging.getLogger(__name__)
COMPONENT = "ocimodel-agent"
RETRY_KINDS = (Kind.UNAVAILABLE, Kind.RESOURCE_EXHAUSTED)
STOP_PULL_WAIT = 3.0


def summarize_nodes(nodes: list[dict[str, Any]]) -> dict[str, int]:
    """``status.summary`` of a ModelCache: how many nodes reported, are ready, failed."""
    phases = [str(n.get("phase", "")) for n in nodes]
    return {"nodes": len(nodes), "ready": phases.count("Ready"), "failed": phases.count("Failed")}


@dataclass
class AgentConfig:
    """Tunables of the agent (intervals in seconds)."""

    node_name: str
    settings: Settings
    metrics_address: str = "0.0.0.0:9810"
    evict_interval: float = 30.0
    gauge_interval: float = 15.0
    node_refresh: float = 30.0
    warm_poll: float = 1.0
    progress_interval: float = 2.0
    retry_after: float = 60.0
    watch_timeout: int = 300
    pull_threads: int = 2
    kube_threads: int = 4


@dataclass
class Tracked:
    """An object this node acts on."""

    spec: ModelCacheSpec
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    phase: str = "Pending"
    result: PullResult | None = None


class Agent:
    """Watches ModelCache objects, pulls what this node should hold, warms and locks, evicts, reports."""

    def __init__(self, config: AgentConfig, kube: KubeClient | None) -> None:
        self.config = config
        self.kube = kube
        self.cache: ModelCache = config.settings.cache()
        root = config.settings.root
        self.pins = Pins(root)
        self.warm_requests = WarmRequests(root)
        self.metrics = AgentMetrics()
        self.flights = PullFlights(config.settings, max_parallel=config.pull_threads, metrics=self.metrics.pulls,
                                   for_volumes=False)  # admin-declared ModelCache objects: node credentials apply
        self.pull_limiter = trio.CapacityLimiter(config.pull_threads)
        self.kube_limiter = trio.CapacityLimiter(config.kube_threads)
        self.io_limiter = trio.CapacityLimiter(2)
        self.objects: dict[str, Tracked] = {}
        self.locks: dict[str, pagecache.LockedFiles] = {}
        self.warmed: dict[str, Path] = {}
        self.node_labels: dict[str, str] = {}
        self.metrics_port = 0
        self._nursery: trio.Nursery | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every service until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._serve_metrics)
                nursery.start_soon(self._every, self.config.evict_interval, self.evict_once)
                if self.config.settings.verify_interval_hours:
                    nursery.start_soon(self._every, self.config.settings.verify_interval_hours * 3600,
                                       self.verify_once)
                nursery.start_soon(self._every, self.config.gauge_interval, self.update_gauges)
                nursery.start_soon(self._every, self.config.warm_poll, self.serve_warm_requests)
                if self.kube is not None:
                    await self._refresh_node()
                    nursery.start_soon(self._every, self.config.node_refresh, self._refresh_node)
                    nursery.start_soon(self._watch_forever)
                log.info("agent running on node %s (metrics on port %d)", self.config.node_name, self.metrics_port)
                task_status.started()
        finally:
            self.flights.shutdown(timeout=STOP_PULL_WAIT)  # pulls stop at their next read; they resume next start
            for locked in self.locks.values():
                locked.release()
            self.locks.clear()

    async def _every(self, seconds: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await action()
            except Exception:
                log.exception("periodic task %s failed", getattr(action, "__name__", action))
            await trio.sleep(seconds)

    async def _serve_metrics(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        host, _, port = self.config.metrics_address.rpartition(":")
        server, _ = start_http_server(int(port), addr=host or "0.0.0.0",  # noqa: S104 - a DaemonSet port
                                      registry=self.metrics.registry)
        self.metrics_port = int(server.server_address[1])
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            server.shutdown()
            server.server_close()

    async def _thread(self, fn: Callable[..., Any], *args: Any, limiter: trio.CapacityLimiter | None = None) -> Any:
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter or self.io_limiter, abandon_on_cancel=True)

    # -- Kubernetes ------------------------------------------------------------------------------------
    async def _kube(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._thread(fn, *args, limiter=self.kube_limiter)

    async def _refresh_node(self) -> None:
        assert self.kube is not None
        labels = await self._kube(self.kube.node_labels, self.config.node_name)
        changed = labels != self.node_labels
        self.node_labels = labels
        if changed:
            for tracked in list(self.objects.values()):
                if not tracked.spec.selects(labels):
                    await self._forget(tracked.spec.owner, deleted=False)

    async def _watch_forever(self) -> None:
        assert self.kube is not None
        kube = self.kube
        backoff = 1.0
        while True:
            try:
                items, version = await self._kube(kube.list_modelcaches, GROUP, VERSION, PLURAL)
                seen = set()
                for obj in items:
                    meta = obj.get("metadata") or {}
                    seen.add(f"{meta.get('namespace')}/{meta.get('name')}")
                    await self.handle_event("ADDED", obj)
                for owner in set(self.objects) - seen:
                    await self._forget(owner, deleted=True)
                self._reconcile_pins()
                backoff = 1.0
                while True:
                    version = await self._watch_once(version)
            except (ModelCacheError, _Gone) as exc:
                log.info("watch restarts in %.0f s: %s", backoff, exc)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    def _reconcile_pins(self) -> None:
        """Keep only the pins of objects that are tracked here and ask for one (those deleted, unpinned or
        moved to other nodes while this agent was down lose theirs)."""
        wanted = {owner for owner, tracked in self.objects.items() if tracked.spec.pin}
        for owner in self.pins.retain(wanted):
            log.info("dropped the pin of %s: no listed ModelCache asks for it", owner)

    async def _watch_once(self, version: str) -> str:
        assert self.kube is not None
        kube = self.kube
        token = trio.lowlevel.current_trio_token()
        latest = [version]

        def blocking() -> None:
            for event_type, obj in kube.watch_modelcaches(GROUP, VERSION, PLURAL, latest[0],
                                                          self.config.watch_timeout, lambda: False):
                if event_type == "ERROR":
                    raise _Gone(str(obj.get("message", obj)))
                rv = (obj.get("metadata") or {}).get("resourceVersion")
                if rv:
                    latest[0] = str(rv)
                if event_type != "BOOKMARK":
                    trio.from_thread.run(self.handle_event, event_type, obj, trio_token=token)

        await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)
        if latest[0] == version:
            await trio.sleep(1.0)
        return latest[0]

    async def handle_event(self, event_type: str, obj: dict[str, Any]) -> None:
        """React to one watch event (also used for the initial list)."""
        meta = obj.get("metadata") or {}
        owner = f"{meta.get('namespace')}/{meta.get('name')}"
        if event_type == "DELETED":
            await self._forget(owner, deleted=True)
            return
        try:
            spec = parse_spec(obj)
        except ModelCacheError as exc:
            await self._apply_status(str(meta.get("namespace")), str(meta.get("name")),
                                     {"phase": "Failed", "message": f"invalid spec: {exc}"})
            return
        tracked = self.objects.get(owner)
        if not spec.selects(self.node_labels):
            if tracked is not None:
                await self._forget(owner, deleted=False)
            return
        if tracked is not None and tracked.spec == spec:
            return
        if tracked is not None:
            tracked.cancel.cancel()
            self._release_lock(owner)
        tracked = Tracked(spec)
        self.objects[owner] = tracked
        assert self._nursery is not None
        self._nursery.start_soon(self._realise, tracked)

    async def _forget(self, owner: str, *, deleted: bool) -> None:
        tracked = self.objects.pop(owner, None)
        if tracked is None:
            return
        tracked.cancel.cancel()
        self._release_lock(owner)
        self.pins.unpin(owner)
        namespace, _, name = owner.partition("/")
        if self.kube is not None:
            try:
                await self._kube(self.kube.patch_node_labels, self.config.node_name,
                                 {node_label(namespace, name): None})
            except ModelCacheError as exc:
                log.warning("could not remove the node label of %s: %s", owner, exc)
        if not deleted:
            await self._apply_status(namespace, name, None)
        log.info("stopped tracking %s (%s)", owner, "deleted" if deleted else "no longer selects this node")

    def _release_lock(self, owner: str) -> None:
        locked = self.locks.pop(owner, None)
        if locked is not None:
            locked.release()
            self.metrics.locked_bytes.set(sum(lf.bytes for lf in self.locks.values()))

    async def _apply_status(self, namespace: str, name: str, entry: dict[str, Any] | None) -> None:
        """Server-side apply this node's entry of ``status.nodes`` (None removes it)."""
        if self.kube is None:
            return
        nodes = []
        if entry is not None:
            nodes = [{"node": self.config.node_name,
                      "lastUpdate": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                      **entry}]
        try:
            await self._kube(self.kube.apply_status, GROUP, VERSION, PLURAL, KIND, namespace, name, {"nodes": nodes},
                             f"{COMPONENT}-{self.config.node_name}")
            if entry is None or "progress" not in entry or entry.get("phase") != "Pulling":  # not per progress tick
                await self._kube(self.kube.update_status_summary, GROUP, VERSION, PLURAL, namespace, name,
                                 summarize_nodes, f"{COMPONENT}-summary")
        except ModelCacheError as exc:
            log.warning("could not write the status of %s/%s: %s", namespace, name, exc)

    async def _event(self, spec: ModelCacheSpec, reason: str, message: str, warning: bool = False) -> None:
        if self.kube is None:
            return
        involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "namespace": spec.namespace,
                    "name": spec.name, "uid": spec.uid}
        try:
            await self._kube(self.kube.create_event, involved, reason, message, "Warning" if warning else "Normal",
                             COMPONENT, self.config.node_name)
        except ModelCacheError as exc:
            log.warning("could not record event %s on %s: %s", reason, spec.owner, exc)

    # -- realising one object ---------------------------------------------------------------------------
    def _credentials(self, spec: ModelCacheSpec) -> CredentialStore:
        store = CredentialStore()
        for secret in spec.pull_secrets:
            assert self.kube is not None
            try:
                data = self.kube.secret_data(spec.namespace, secret)
            except ModelCacheError as exc:
                if exc.kind is not Kind.PERMISSION_DENIED:
                    raise
                raise ModelCacheError(f"{exc}; node agents may read pull secrets only in namespaces an admin "
                                      f"granted: add a RoleBinding to ClusterRole ocimodel-node-pull-secrets in "
                                      f"{spec.namespace}", kind=Kind.PERMISSION_DENIED) from None
            if ".dockerconfigjson" not in data:
                raise ModelCacheError(f"secret {spec.namespace}/{secret} has no .dockerconfigjson key",
                                      kind=Kind.INVALID_ARGUMENT)
            store.add_docker_config(data[".dockerconfigjson"], source=f"secret {spec.namespace}/{secret}")
        return store

    async def _realise(self, tracked: Tracked) -> None:
        spec = tracked.spec
        with tracked.cancel:
            while True:
                try:
                    await self._pull_and_prepare(tracked)
                    return
                except ModelCacheError as exc:
                    log.warning("%s failed: %s", spec.owner, exc)
                    tracked.phase = "Failed"
                    await self._apply_status(spec.namespace, spec.name, {"phase": "Failed", "message": str(exc)})
                    await self._event(spec, "PullFailed", f"node {self.config.node_name}: {exc}", warning=True)
                    if exc.kind not in RETRY_KINDS:
                        return
                except Exception as exc:
                    log.exception("preparing %s failed", spec.owner)
                    tracked.phase = "Failed"
                    await self._apply_status(spec.namespace, spec.name,
                                             {"phase": "Failed", "message": f"internal error: {exc}"})
                    return
                await trio.sleep(self.config.retry_after)

    async def _pull_and_prepare(self, tracked: Tracked) -> None:
        spec = tracked.spec
        tracked.phase = "Pulling"
        log.info("reconciling %s: pulling %s", spec.owner, spec.reference)
        await self._apply_status(spec.namespace, spec.name,
                                 {"phase": "Pulling", "message": f"pulling {spec.reference}"})
        await self._event(spec, "Pulling", f"pulling {spec.reference} to node {self.config.node_name}")
        try:  # failures before the pull starts count as failed pulls here; the pull's own, in the flight
            credentials = await self._kube(self._credentials, spec) if spec.pull_secrets else None
            flight = await self._thread(self.flights.start, spec.reference, PullOptions(),
                                        credentials, f"{spec.namespace}/{','.join(spec.pull_secrets)}")
        except ModelCacheError as exc:
            self.metrics.pulls.failed.labels(reason=exc.kind.name).inc()
            raise
        reporter = trio.CancelScope()

        async def report_progress() -> None:
            with reporter:
                await self._report_progress(spec, flight.progress)

        assert self._nursery is not None
        self._nursery.start_soon(report_progress)
        try:
            result: PullResult = await self._thread(flight.future.result, limiter=self.pull_limiter)
        finally:
            reporter.cancel()
        tracked.result = result
        if spec.pin:
            self.pins.pin(spec.owner, result.record.key)
        else:
            self.pins.unpin(spec.owner)
        message = f"{result.record.total_bytes} bytes in {result.record.files} files"
        resident = 0
        if spec.warm or spec.lock:
            report = await self._thread(self._warm, result.path)
            resident = report.resident_bytes
            self.warmed[spec.owner] = result.path
            if report.message:
                message += f"; {report.message}"
        self._release_lock(spec.owner)
        if spec.lock:
            try:
                # not abandoned on cancel: the mappings must be released, never left to a lost thread
                locked = await trio.to_thread.run_sync(self._lock_files, result.path, limiter=self.io_limiter)
            except (OSError, ModelCacheError) as exc:
                message += f"; could not lock in memory: {exc}"
            else:
                if self.objects.get(spec.owner) is not tracked:  # changed or deleted while locking
                    locked.release()
                    return
                self.locks[spec.owner] = locked
                self.metrics.locked_bytes.set(sum(lf.bytes for lf in self.locks.values()))
        if self.kube is not None:
            await self._kube(self.kube.patch_node_labels, self.config.node_name,
                             {node_label(spec.namespace, spec.name): "ready"})
        tracked.phase = "Ready"
        log.info("%s is ready (%s)", spec.owner, message)
        await self._apply_status(spec.namespace, spec.name, {
            "phase": "Ready", "digest": result.record.digest, "bytes": result.record.total_bytes,
            "progress": "100%", "residentBytes": resident, "message": message})
        await self._event(spec, "Pulled", f"{spec.reference} is ready on node {self.config.node_name} ({message})")

    def _lock_files(self, path: Path) -> pagecache.LockedFiles:
        return pagecache.LockedFiles([path], max_bytes=pagecache.warm_budget(self.config.settings.warm_memory_share))

    def _warm(self, path: Path) -> pagecache.Report:
        return pagecache.warm([path], memory_share=self.config.settings.warm_memory_share)

    async def _report_progress(self, spec: ModelCacheSpec, progress: Progress) -> None:
        while True:
            await trio.sleep(self.config.progress_interval)
            percent = 100.0 * progress.done_bytes / progress.total_bytes if progress.total_bytes else 0.0
            await self._apply_status(spec.namespace, spec.name, {
                "phase": "Pulling", "bytes": progress.total_bytes, "progress": f"{math.floor(percent)}%",
                "message": progress.describe()})

    # -- periodic work ----------------------------------------------------------------------------------
    async def evict_once(self) -> None:
        """Apply the disk watermarks."""
        protected = {t.result.record.key for t in self.objects.values() if t.result is not None and t.spec.pin}
        settings = self.config.settings
        result = await self._thread(lambda: evict(self.cache, high=settings.high_watermark,
                                                  low=settings.low_watermark, protected=protected))
        if result.evicted:
            self.metrics.evictions.inc(len(result.evicted))

    async def verify_once(self) -> None:
        """Hash the cache again; take models with a changed blob out of use (mounted ones are reported)."""
        report = await self._thread(lambda: verify_cache(self.cache, repair=True))
        self.metrics.corrupt_blobs.inc(len(report.bad))
        for bad in report.bad:
            log.error("cache verification: blob %s changed on disk; removed %s, kept (in use) %s%s", bad.digest,
                      bad.removed_models or "no model", bad.kept_models or "none",
                      f", quarantined at {bad.quarantined}" if bad.quarantined else "")
        log.info("cache verification: %d blobs, %d bytes, %d changed", report.blobs, report.bytes, len(report.bad))

    async def update_gauges(self) -> None:
        """Refresh the cache, mount and page-cache gauges."""
        def measure() -> tuple[Any, int, int]:
            measured = usage(self.cache)
            mounts = len(mounts_of(self.cache.store.trees, inside=True))
            resident = sum(pagecache.report([p]).resident_bytes for p in self.warmed.values() if p.exists())
            return measured, mounts, resident
        measured, mounts, resident = await self._thread(measure)
        self.metrics.cache_bytes.set(measured.disk_bytes)
        self.metrics.cache_models.set(measured.models)
        self.metrics.cache_blobs.set(measured.blobs)
        self.metrics.mounts_in_use.set(mounts)
        self.metrics.resident_bytes.set(resident)

    async def serve_warm_requests(self) -> None:
        """Warm the models the CSI driver asked for (volume attribute warm: "true")."""
        for request in self.warm_requests.take():
            path = Path(request["path"])
            if path.is_dir():
                report = await self._thread(self._warm, path)
                self.warmed[request["key"] or str(path)] = path
                log.info("warmed %s: %d of %d bytes resident", path, report.resident_bytes, report.total_bytes)


class _Gone(Exception):
    """The watch's resourceVersion is too old (or the stream reported an error): list again."""


def run_agent(config: AgentConfig, kubeconfig: str) -> None:
    """Run the agent until SIGTERM or SIGINT. ``kubeconfig``: '' for in-cluster, 'none' for no Kubernetes."""
    kube = None
    if kubeconfig != "none":
        kube = KubeClient.connect(kubeconfig or None)
    agent = Agent(config, kube)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                await nursery.start(agent.run)
                async for signum in signals:
                    log.info("signal %d: shutting down", signum)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
