"""The node agent: one trio process per node. Services run in one nursery; blocking work (pulls,
Kubernetes calls, page-cache scans) runs in worker threads behind capacity limiters."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kubeadapter.client import KubeClient
from modelcache import pagecache
from modelcache.cache import ModelCache
from modelcache.errors import Kind, ModelCacheError
from modelcache.metrics import serve_metrics
from modelcache.mounts import mounts_of
from modelcache.settings import Settings
from modelcache.singleflight import PullFlights
from modelcache.upkeep.eviction import evict
from modelcache.upkeep.gc import usage
from modelcache.upkeep.verify import verify_cache
from modelcache.warmrequests import WarmRequests
from node_agent import GROUP, PLURAL, VERSION
from node_agent.metrics import AgentMetrics
from node_agent.reporting import Reporter
from node_agent.revisions import Realiser, Tracked, jittered
from node_agent.spec import node_labels, parse_spec

log = logging.getLogger(__name__)
RETRY_KINDS = (Kind.UNAVAILABLE, Kind.RESOURCE_EXHAUSTED)
STOP_PULL_WAIT = 3.0


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


class Agent:
    """Watches ModelCache objects, pulls what this node should hold, warms and locks, evicts, reports."""

    def __init__(self, config: AgentConfig, kube: KubeClient | None) -> None:
        self.config = config
        self.kube = kube
        self.cache: ModelCache = config.settings.cache()
        self.warm_requests = WarmRequests(config.settings.root)
        self.metrics = AgentMetrics()
        self.flights = PullFlights(config.settings, max_parallel=config.pull_threads, metrics=self.metrics.pulls,
                                   for_volumes=False)  # admin-declared ModelCache objects: node credentials apply
        self.reporter = Reporter(kube, config.node_name, config.kube_threads)
        self.realiser = Realiser(config.settings, self.flights, self.reporter, self.metrics,
                                 lambda t: self.objects.get(t.spec.owner) is t, pull_threads=config.pull_threads,
                                 progress_interval=config.progress_interval)
        self.objects: dict[str, Tracked] = {}
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
            for owner in list(self.realiser.locks):
                self.realiser.release_lock(owner)

    async def _every(self, seconds: float, action: Callable[[], Awaitable[None]]) -> None:
        while True:
            try:
                await action()
            except Exception:
                log.exception("periodic task %s failed", getattr(action, "__name__", action))
            await trio.sleep(seconds)

    async def _serve_metrics(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        server = serve_metrics(self.config.metrics_address, self.metrics.registry, setting="metrics_address",
                               default_host="0.0.0.0")  # noqa: S104 - a DaemonSet port
        self.metrics_port = int(server.server_address[1])
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            server.shutdown()
            server.server_close()

    # -- Kubernetes ------------------------------------------------------------------------------------
    async def _refresh_node(self) -> None:
        assert self.kube is not None
        labels = await self.reporter.call(self.kube.node_labels, self.config.node_name)
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
                items, version = await self.reporter.call(kube.list_modelcaches, GROUP, VERSION, PLURAL)
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
        for owner in self.realiser.pins.retain(wanted):
            log.info("dropped the pin of %s: no listed ModelCache asks for it", owner)
        for owner in self.realiser.store.retain(set(self.objects)):
            log.info("dropped the revisions of %s: no listed ModelCache selects this node for it", owner)

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
            await self.reporter.status(str(meta.get("namespace")), str(meta.get("name")),
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
            self.realiser.release_lock(owner)
        tracked = Tracked(spec)
        self.objects[owner] = tracked
        assert self._nursery is not None
        self._nursery.start_soon(self._realise, tracked)

    async def _forget(self, owner: str, *, deleted: bool) -> None:
        tracked = self.objects.pop(owner, None)
        if tracked is None:
            return
        spec = tracked.spec
        tracked.cancel.cancel()
        self.realiser.release_lock(owner)
        self.realiser.pins.unpin(owner)
        self.realiser.store.remove(owner)  # the plugin stops serving its tag from this node's revision
        try:
            await self.reporter.labels(node_labels(spec, None))
        except ModelCacheError as exc:
            log.warning("could not remove the node labels of %s: %s", owner, exc)
        if not deleted:
            await self.reporter.status(spec.namespace, spec.name, None)
        log.info("stopped tracking %s (%s)", owner, "deleted" if deleted else "no longer selects this node")

    # -- realising one object ---------------------------------------------------------------------------
    async def _realise(self, tracked: Tracked) -> None:
        spec = tracked.spec
        with tracked.cancel:
            while True:
                try:
                    await self.realiser.bring_up(tracked)
                    break
                except ModelCacheError as exc:
                    if tracked.result is not None:  # a current revision serves: carry on with it
                        await self.realiser.problem(tracked, exc)
                        break
                    log.warning("%s failed: %s", spec.owner, exc)
                    tracked.phase = "Failed"
                    await self.reporter.status(spec.namespace, spec.name, {"phase": "Failed", "message": str(exc)})
                    await self.reporter.event(spec, "PullFailed", f"node {self.config.node_name}: {exc}", warning=True)
                    if exc.kind not in RETRY_KINDS:
                        return
                except Exception as exc:
                    log.exception("preparing %s failed", spec.owner)
                    tracked.phase = "Failed"
                    await self.reporter.status(spec.namespace, spec.name,
                                               {"phase": "Failed", "message": f"internal error: {exc}"})
                    return
                await trio.sleep(self.config.retry_after)
            while spec.follows:
                await trio.sleep(jittered(spec.resolve_interval))
                try:
                    await self.realiser.follow(tracked)
                except ModelCacheError as exc:
                    await self.realiser.problem(tracked, exc)
                except Exception:
                    log.exception("following %s failed", spec.owner)

    # -- periodic work ----------------------------------------------------------------------------------
    async def evict_once(self) -> None:
        """Apply the disk watermarks."""
        protected = {t.result.record.key for t in self.objects.values() if t.result is not None and t.spec.pin}
        settings = self.config.settings
        result = await self.realiser.thread(lambda: evict(self.cache, high=settings.high_watermark,
                                                  low=settings.low_watermark, protected=protected))
        if result.evicted:
            self.metrics.evictions.inc(len(result.evicted))

    async def verify_once(self) -> None:
        """Hash the cache again; take models with a changed blob out of use (mounted ones are reported)."""
        report = await self.realiser.thread(lambda: verify_cache(self.cache, repair=True))
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
            resident = sum(pagecache.report([p]).resident_bytes for p in self.realiser.warmed.values() if p.exists())
            return measured, mounts, resident
        measured, mounts, resident = await self.realiser.thread(measure)
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
                report = await self.realiser.thread(self.realiser.warm, path)
                self.realiser.warmed[request["key"] or str(path)] = path
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
