"""One ModelCache on this node, revision by revision: the first pull; with ``updatePolicy: Follow`` the tag
resolved again (a HEAD) every ``resolveIntervalSeconds`` with jitter, a moved tag's revision staged (pulled,
warmed if asked) while the current one stays pinned and mounted, and a switch once it is complete; a switch
back to a kept revision without a download (``spec.revision``); pins of the kept revisions; and the revision
file the CSI plugin reads (:mod:`modelcache.revisions`)."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from modelcache import pagecache
from modelcache.errors import ModelCacheError
from modelcache.progress import Progress
from modelcache.records import PullResult
from modelcache.registry.reference import Reference, parse_reference
from modelcache.revisions import Revision, Revisions, RevisionState
from modelcache.settings import Settings
from modelcache.singleflight import PullFlights
from modelcache.upkeep.gc import in_use
from modelcache.upkeep.pins import Pins
from node_agent.metrics import AgentMetrics
from node_agent.reporting import Reporter, timestamp
from node_agent.spec import ModelCacheSpec, node_labels

log = logging.getLogger(__name__)


@dataclass
class Tracked:
    """An object this node acts on."""

    spec: ModelCacheSpec
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    phase: str = "Pending"
    result: PullResult | None = None  # the tree of the current revision
    state: RevisionState = field(default_factory=lambda: RevisionState("", ""))
    resident: int = 0
    message: str = ""
    problem: str = ""  # why the last resolve or staging failed (the current revision still serves)
    staged_progress: str = ""


def jittered(interval: float) -> float:
    """``interval`` shortened by up to a fifth, so that a fleet does not resolve at once and a node's revision
    never goes stale between two resolves under the default ``maxStalenessSeconds`` (the interval)."""
    return interval * random.uniform(0.8, 1.0)  # noqa: S311 - spreading load, not a secret


def _same_tag(a: str, b: Reference) -> bool:
    ref = parse_reference(a)
    return (ref.registry, ref.repository, ref.tag) == (b.registry, b.repository, b.tag)


class Realiser:
    """Pulls, stages, warms, locks, pins and switches the revisions of the objects the agent tracks."""

    def __init__(self, settings: Settings, flights: PullFlights, reporter: Reporter, metrics: AgentMetrics,
                 is_tracked: Callable[[Tracked], bool], *, pull_threads: int, progress_interval: float) -> None:
        self.settings = settings
        self.flights = flights
        self.cache = flights.cache
        self.reporter = reporter
        self.metrics = metrics
        self.is_tracked = is_tracked
        self.progress_interval = progress_interval
        self.pins = Pins(settings.root)
        self.store = Revisions(settings.root)
        self.locks: dict[str, pagecache.LockedFiles] = {}
        self.warmed: dict[str, Path] = {}
        self.pull_limiter = trio.CapacityLimiter(pull_threads)
        self.io_limiter = trio.CapacityLimiter(2)

    async def thread(self, fn: Callable[..., Any], *args: Any, limiter: trio.CapacityLimiter | None = None) -> Any:
        """Run blocking work in a worker thread (abandoned on cancel)."""
        return await trio.to_thread.run_sync(fn, *args, limiter=limiter or self.io_limiter, abandon_on_cancel=True)

    # -- entry points ------------------------------------------------------------------------------------
    async def bring_up(self, tracked: Tracked) -> None:
        """Serve the current revision kept from before (an agent restart, a changed spec) at once, then move to
        the revision the spec asks for: a fixed one, the one resolved once (Pinned), or where the tag points."""
        spec = tracked.spec
        self._restore(tracked)
        state = tracked.state
        if tracked.result is not None and state.current is not None:
            await self._settle(tracked, state.current, tracked.result, switched=False)
        target = spec.fixed
        if target is None and not spec.follows and state.current is not None and state.resolved_at \
                and _same_tag(state.current.reference, spec.reference):
            target = parse_reference(state.current.reference)  # Pinned: resolved once already
        await self._advance(tracked, target or await self._resolve(tracked))

    async def follow(self, tracked: Tracked) -> None:
        """One tick of ``updatePolicy: Follow``: let go of revisions beyond ``keepRevisions`` whose volumes are
        gone, resolve the tag and stage what it names now."""
        if self._trim(tracked):
            self._pin(tracked)
            self._save(tracked)
        await self._advance(tracked, await self._resolve(tracked))

    async def problem(self, tracked: Tracked, exc: ModelCacheError) -> None:
        """A resolve or a staging failed while the current revision serves: say so, keep serving."""
        spec, state = tracked.spec, tracked.state
        what = f"staging {state.staged}" if state.staged else f"resolving {spec.reference}"
        tracked.problem = f"{what} failed: {exc}"
        log.warning("%s: %s; revision %s still serves", spec.owner, tracked.problem,
                    state.current.digest if state.current else "none")
        await self.reporter.status(spec.namespace, spec.name, self.entry(tracked))
        await self.reporter.event(spec, "StagingFailed" if state.staged else "ResolveFailed",
                                  f"node {self.reporter.node_name}: {tracked.problem}", warning=True)

    def release_lock(self, owner: str) -> None:
        """Release the pages ``owner`` locked."""
        locked = self.locks.pop(owner, None)
        if locked is not None:
            locked.release()
            self.metrics.locked_bytes.set(sum(lf.bytes for lf in self.locks.values()))

    def entry(self, tracked: Tracked) -> dict[str, Any]:
        """This node's ``status.nodes`` entry for a tracked object with a current revision."""
        state, result = tracked.state, tracked.result
        assert state.current is not None and result is not None
        entry: dict[str, Any] = {
            "phase": "Ready", "digest": state.current.digest, "bytes": result.record.total_bytes,
            "progress": "100%", "residentBytes": tracked.resident,
            "message": "; ".join(m for m in (tracked.message, tracked.problem) if m),
            "revisions": [r.digest for r in state.kept]}
        if state.switched_at:
            entry["switchedAt"] = timestamp(state.switched_at)
        if state.staged:
            entry.update(stagedDigest=state.staged, stagedProgress=tracked.staged_progress or "0%")
        return entry

    # -- steps ---------------------------------------------------------------------------------------------
    def _restore(self, tracked: Tracked) -> None:
        """Load the object's revision file; kept revisions count only while their trees are in the cache."""
        spec = tracked.spec
        state = self.store.load(spec.owner) or RevisionState(spec.owner, str(spec.reference))
        state.kept = [r for r in state.kept if self.cache.get_record(r.key) is not None]
        current = state.current if state.current in state.kept else None
        tracked.result = self.flights.cached(parse_reference(current.reference), spec.options) if current else None
        state.current = current if tracked.result is not None else None
        tracked.state = state

    async def _resolve(self, tracked: Tracked) -> Reference:
        """Where the tag points now (one HEAD); the time is recorded for the plugin (``maxStalenessSeconds``). On a
        node without a revision yet, a failure counts as a failed pull."""
        spec = tracked.spec
        try:
            credentials = await self.reporter.credentials(spec)
            pinned: Reference = await self.thread(self.flights.resolve, spec.reference, credentials)
        except ModelCacheError as exc:
            if tracked.result is None:
                self.metrics.pulls.failed.labels(reason=exc.kind.name).inc()
            raise
        tracked.state.resolved_at = time.time()
        tracked.problem = ""
        if tracked.result is not None:
            self._save(tracked)
        log.debug("%s: %s resolves to %s", spec.owner, spec.reference, pinned.digest)
        return pinned

    async def _advance(self, tracked: Tracked, target: Reference) -> None:
        """Make ``target`` the current revision: at once when it is cached here (a kept revision), else staged
        first (the current one keeps serving) or, on a node without one, pulled."""
        spec, state = tracked.spec, tracked.state
        digest = str(target.digest)
        if state.current is not None and state.current.digest == digest:
            if state.staged:  # the tag moved back before the staged revision was complete
                state.staged = ""
                self._save(tracked)
                await self.reporter.status(spec.namespace, spec.name, self.entry(tracked))
            return
        result = self.flights.cached(target, spec.options)
        if result is None:
            node = self.reporter.node_name
            if state.current is None:
                tracked.phase = "Pulling"
                log.info("reconciling %s: pulling %s", spec.owner, target)
                await self.reporter.status(spec.namespace, spec.name,
                                           {"phase": "Pulling", "message": f"pulling {target}"})
                await self.reporter.event(spec, "Pulling", f"pulling {target} to node {node}")
            else:
                state.staged, tracked.staged_progress = digest, "0%"
                self._save(tracked)
                log.info("%s: staging %s on node %s; %s keeps serving", spec.owner, target, node,
                         state.current.digest)
                await self.reporter.status(spec.namespace, spec.name, self.entry(tracked))
                await self.reporter.event(spec, "StagingRevision", f"node {node}: staging {digest} ({spec.reference} "
                                                                   f"moved); {state.current.digest} keeps serving")
            result = await self._obtain(tracked, target)
        await self._settle(tracked, Revision(str(target), digest, result.record.key), result, switched=True)

    async def _obtain(self, tracked: Tracked, target: Reference) -> PullResult:
        """Pull ``target`` through the node's single flight, reporting progress."""
        spec = tracked.spec
        try:  # failures before the pull starts count as failed pulls here; the pull's own, in the flight
            credentials = await self.reporter.credentials(spec)
            flight = await self.thread(self.flights.start, target, spec.options, credentials,
                                       f"{spec.namespace}/{','.join(spec.pull_secrets)}")
        except ModelCacheError as exc:
            self.metrics.pulls.failed.labels(reason=exc.kind.name).inc()
            raise
        failure: ModelCacheError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_progress, tracked, flight.progress)
            try:
                result: PullResult = await self.thread(flight.future.result, limiter=self.pull_limiter)
            except ModelCacheError as exc:  # raised out of the nursery it would reach callers as an ExceptionGroup
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    async def _report_progress(self, tracked: Tracked, progress: Progress) -> None:
        spec = tracked.spec
        while True:
            await trio.sleep(self.progress_interval)
            done = progress.done_bytes / progress.total_bytes if progress.total_bytes else 0.0
            percent = f"{math.floor(100.0 * done)}%"
            if tracked.state.staged:
                tracked.staged_progress = percent
                entry = self.entry(tracked)
            else:
                entry = {"phase": "Pulling", "bytes": progress.total_bytes, "progress": percent,
                         "message": progress.describe()}
            await self.reporter.status(spec.namespace, spec.name, entry, summary=False)

    async def _settle(self, tracked: Tracked, revision: Revision, result: PullResult, *, switched: bool) -> None:
        """Warm (if asked), then make ``revision`` current: pins, revision file, page locks, node labels, status;
        a switch is logged and recorded as an Event."""
        spec, state = tracked.spec, tracked.state
        message = f"{result.record.total_bytes} bytes in {result.record.files} files"
        resident = 0
        if spec.warm or spec.lock:
            report = await self.thread(self.warm, result.path)
            resident = report.resident_bytes
            self.warmed[spec.owner] = result.path
            if report.message:
                message += f"; {report.message}"
        previous = state.current
        state.current, tracked.result = revision, result
        if switched:
            state.kept = [revision, *(r for r in state.kept if r.digest != revision.digest)]
            state.staged, tracked.staged_progress, state.switched_at = "", "", time.time()
            self._trim(tracked)
        self._pin(tracked)
        self._save(tracked)
        message = await self._lock(tracked, result.path, message)
        if not self.is_tracked(tracked):
            return
        await self.reporter.labels(node_labels(spec, revision.digest))
        tracked.phase, tracked.message, tracked.resident = "Ready", message, resident
        await self.reporter.status(spec.namespace, spec.name, self.entry(tracked))
        node = self.reporter.node_name
        if switched and previous is not None:
            log.info("%s switched from %s to %s on node %s (%s)", spec.owner, previous.digest, revision.digest, node,
                     message)
            await self.reporter.event(spec, "RevisionSwitched", f"node {node} switched from {previous.digest} to "
                                                                f"{revision.digest} ({message})")
        elif switched:
            log.info("%s is ready (%s)", spec.owner, message)
            await self.reporter.event(spec, "Pulled", f"{spec.reference} is ready on node {node} ({message})")

    def _trim(self, tracked: Tracked) -> bool:
        """Let go of revisions beyond ``keepRevisions`` (never the current one, nor one still mounted);
        True when some went."""
        state = tracked.state
        kept = [r for i, r in enumerate(state.kept)
                if i < tracked.spec.keep_revisions or r == state.current or in_use(self.cache, r.key)]
        dropped = [r.digest for r in state.kept if r not in kept]
        if dropped:
            log.info("%s no longer keeps %s (keepRevisions %d)", tracked.spec.owner, ", ".join(dropped),
                     tracked.spec.keep_revisions)
        state.kept = kept
        return bool(dropped)

    def _pin(self, tracked: Tracked) -> None:
        spec, keys = tracked.spec, [r.key for r in tracked.state.kept]
        if spec.pin and keys:
            self.pins.pin(spec.owner, *keys)
        else:
            self.pins.unpin(spec.owner)

    def _save(self, tracked: Tracked) -> None:
        spec, state = tracked.spec, tracked.state
        state.owner, state.reference, state.max_staleness = spec.owner, str(spec.reference), spec.staleness
        fixed = spec.fixed
        state.fixed = fixed is not None and state.current is not None and state.current.digest == str(fixed.digest)
        self.store.save(state)

    async def _lock(self, tracked: Tracked, path: Path, message: str) -> str:
        spec = tracked.spec
        self.release_lock(spec.owner)
        if not spec.lock:
            return message
        try:
            # not abandoned on cancel: the mappings must be released, never left to a lost thread
            locked = await trio.to_thread.run_sync(self._lock_files, path, limiter=self.io_limiter)
        except (OSError, ModelCacheError) as exc:
            return f"{message}; could not lock in memory: {exc}"
        if not self.is_tracked(tracked):  # changed or deleted while locking
            locked.release()
        else:
            self.locks[spec.owner] = locked
            self.metrics.locked_bytes.set(sum(lf.bytes for lf in self.locks.values()))
        return message

    def _lock_files(self, path: Path) -> pagecache.LockedFiles:
        return pagecache.LockedFiles([path], max_bytes=pagecache.warm_budget(self.settings.warm_memory_share))

    def warm(self, path: Path) -> pagecache.Report:
        """Read ``path`` into page cache (within the node's warm memory share)."""
        return pagecache.warm([path], memory_share=self.settings.warm_memory_share)
