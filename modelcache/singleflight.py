"""One download per model: the first caller starts a background pull, later callers join it and wait only
as long as they choose. Across processes the content store's flocks make it one fetch per blob and tree;
within a process this module makes it one pull per (reference, options, credentials). The CSI node service
and the node agent both pull through it."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from modelcache.assemble.options import PullOptions
from modelcache.cache import ModelCache
from modelcache.errors import Kind, ModelCacheError, StoreFull
from modelcache.metrics import PullMetrics
from modelcache.progress import Progress
from modelcache.records import PullResult, tree_key
from modelcache.registry.access import check_upstream_access, upstream_hosts
from modelcache.registry.client import RegistryClient
from modelcache.registry.credentials import CredentialStore
from modelcache.registry.reference import Reference, parse_reference
from modelcache.settings import Settings
from modelcache.trust.signatures import FileSignature
from modelcache.upkeep.eviction import make_room

log = logging.getLogger(__name__)


@dataclass
class Flight:
    """A pull in progress (or finished): its digest-pinned reference, result and progress."""

    reference: Reference  # as asked for: a tag is pinned inside the flight
    future: Future[PullResult]
    progress: Progress
    started: float = field(default_factory=time.monotonic)
    pulling: bool = False  # past the cache check: this flight downloads
    marker: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # its pull marker, once pinned

    def pending(self) -> str:
        """What a caller that will not wait any longer is told."""
        return (f"pulling {self.reference} in the background ({self.progress.describe()}); "
                f"the next attempt joins the same pull")


class PullFlights:
    """Runs pulls on a bounded pool, one per (reference, options, credentials) at a time. ``for_volumes``:
    pulls for volumes, to which node-wide credentials are lent only for ``nodeCredentialRegistries`` (the
    agent and the command line pass False and use them all)."""

    def __init__(self, settings: Settings, *, max_parallel: int = 4, metrics: PullMetrics | None = None,
                 for_volumes: bool = True) -> None:
        self.settings = settings
        self.metrics = metrics
        self.for_volumes = for_volumes
        self.cache = settings.cache(for_volume=for_volumes)
        settings.signature_policy.persist_in(self.cache.store.root / "verdicts")
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="pull")
        self._flights: dict[tuple[str, str, str], Flight] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def _cache_for(self, credentials: CredentialStore | None) -> ModelCache:
        return self.cache if credentials is None else self.settings.cache(credentials, for_volume=self.for_volumes)

    def cached(self, reference: Reference, options: PullOptions) -> PullResult | None:
        """A digest-pinned reference already in the cache (no network), when the signature policy needs
        nothing more for it: a tree is served under a rule only with that rule's verdict for the reference's
        repository (a tree pulled under another name must be checked for this one first)."""
        if not self.settings.signature_policy.already_verified(reference):
            return None
        return self.cache.cached(reference, options)

    def start(self, reference: Reference, options: PullOptions, credentials: CredentialStore | None,
              credentials_id: str) -> Flight:
        """The flight that makes ``reference`` available: a finished one for a cached digest, the running
        one for this model, or a new one. Never blocks on the network: pinning a tag to its digest, the
        cache check and the pull all run in the flight."""
        if reference.digest:
            hit = self.cached(reference, options)
            if hit:
                done: Future[PullResult] = Future()
                done.set_result(hit)
                return Flight(reference, done, Progress(phase="ready"))
        key = (str(reference), options.variant(), credentials_id)
        with self._lock:
            flight = self._flights.get(key)
            # a failed flight whose done-callback has not yet removed it (its waiters wake before callbacks
            # run) is not joined: the caller retrying at once would get that failure again
            if flight is None or (flight.future.done() and (flight.future.cancelled() or
                                                           flight.future.exception() is not None)):
                if self._stopping.is_set():
                    raise ModelCacheError("the plugin is shutting down", kind=Kind.UNAVAILABLE)
                flight = Flight(reference, Future(), Progress())
                flight.future = self._pool.submit(self._fly, flight, options, credentials)
                self._flights[key] = flight
                new = flight
            else:
                new = None
        if new is not None:  # outside the lock: a flight already done runs the callback here, and it takes the lock
            new.future.add_done_callback(functools.partial(self._finished, key, new))
        return flight

    def _fly(self, flight: Flight, options: PullOptions, credentials: CredentialStore | None) -> PullResult:
        reference = flight.reference
        pinned = reference if reference.digest else self.pin(reference, options, credentials)
        if pinned.digest:  # a lazy server of this model leaves the download to this pull while it is marked
            try:
                flight.marker.enter_context(self.cache.store.pulling(tree_key(pinned.digest, options)))
            except OSError as exc:
                log.warning("could not mark the pull of %s (%s): a lazy server may download it too", pinned, exc)
        cache = self._cache_for(credentials)
        files_signed = self.settings.signature_policy.check(cache.client, pinned)  # before anything is cached
        check_tree = files_signed.verify_tree if files_signed is not None else None
        hit = cache.cached(pinned, options)
        if hit:
            if check_tree is not None:
                check_tree(cache.store.trees / hit.record.key)
            return hit
        flight.pulling = True
        log.info("pull of %s started", pinned)
        if self.metrics:
            self.metrics.started.inc()
        while True:
            try:
                return cache.pull(pinned, options, flight.progress, cancel=self._stopping, check_tree=check_tree)
            except StoreFull as exc:  # evict before failing; give up once nothing more can go
                # giving up drops the partial downloads nobody is writing, so that a disk this pull filled does
                # not stay full (records, pins and publications must still be writable)
                try:
                    evicted = make_room(cache, exc.needed, self.settings.low_watermark, str(exc)).evicted
                except StoreFull:
                    cache.store.clear_partials()
                    raise
                if not evicted:
                    cache.store.clear_partials()
                    raise StoreFull(f"{exc}; nothing can be evicted (every cached model is mounted, pinned or in "
                                    f"use), so none was evicted", needed=exc.needed) from None

    def authorize(self, reference: Reference, credentials: CredentialStore | None) -> FileSignature | None:
        """Check digest-pinned ``reference`` against the signature policy (for paths that do not pull
        through a flight, such as a lazy mount). A :class:`FileSignature` means the policy is met only by a
        signature over the files: they must all be pulled and checked before any is shown."""
        return self.settings.signature_policy.check(self._cache_for(credentials).client, reference)

    def resolve(self, reference: Reference, credentials: CredentialStore | None) -> Reference:
        """Pin a tag to the digest it names now, with one HEAD of its manifest (registries that limit pulls
        count GETs, not HEADs); no fallback."""
        transport = self.settings.transport(credentials, for_volume=self.for_volumes)
        return reference.with_digest(RegistryClient(transport).head_digest(reference))

    def pin(self, reference: Reference, options: PullOptions, credentials: CredentialStore | None) -> Reference:
        """Pin a tag to its digest; if the registry is unreachable, fall back to the newest cached copy
        of that tag, unless that model needed credentials (access could not be re-checked)."""
        try:
            return self.resolve(reference, credentials)
        except ModelCacheError as exc:
            if exc.kind is not Kind.UNAVAILABLE:
                raise
            prefix = f"{reference}@"
            variant = options.variant()
            candidates = [r for r in self.cache.records()
                          if r.reference.startswith(prefix) and r.key.endswith(variant) and not r.auth_required]
            if not candidates:
                raise
            newest = max(candidates, key=lambda r: self.cache.last_used(r.key))
            log.warning("registry unreachable resolving %s; using cached %s", reference, newest.digest)
            return parse_reference(newest.reference)

    def _finished(self, key: tuple[str, str, str], flight: Flight, _future: object = None) -> None:
        flight.marker.close()
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        if flight.future.cancelled():
            return
        error = flight.future.exception()
        elapsed = time.monotonic() - flight.started
        if error:
            log.warning("pull of %s failed after %.1f s: %s", key[0], elapsed, error)
        elif flight.pulling:
            done = flight.progress.downloaded_bytes
            log.info("pull of %s finished: %d bytes downloaded in %.1f s (%.1f MB/s)", key[0], done, elapsed,
                     done / max(elapsed, 1e-6) / 1e6)
        if self.metrics and (error or flight.pulling):
            kind = error.kind.name if isinstance(error, ModelCacheError) else ("INTERNAL" if error else None)
            self.metrics.finished(elapsed, flight.progress.downloaded_bytes, kind)

    def check_access(self, result: PullResult, credentials: CredentialStore | None) -> None:
        """Make sure the caller's credentials may read a model that is private at its upstream (see
        :meth:`check_upstream`); a public one needs nothing."""
        if result.record.auth_required:
            self.check_upstream(parse_reference(result.record.reference), credentials)

    def check_upstream(self, reference: Reference, credentials: CredentialStore | None) -> None:
        """Make sure the caller's credentials (with the node's it is lent) may read digest-pinned ``reference``
        at its upstream registry, never a mirror: UNAUTHENTICATED/PERMISSION_DENIED when they may not; an
        unreachable upstream also denies (access cannot be proven)."""
        upstream = replace(self.settings, hosts=upstream_hosts(self.settings.hosts))
        check_upstream_access(RegistryClient(upstream.transport(credentials, for_volume=self.for_volumes)), reference)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop: refuse new pulls, cancel queued ones, and make running ones stop at their next read,
        leaving their partial downloads to resume on the next start; wait up to ``timeout`` for them."""
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        with self._lock:
            running = [f.future for f in self._flights.values()]
        for future in running:
            with contextlib.suppress(BaseException):
                future.exception(timeout=max(deadline - time.monotonic(), 0.0))
