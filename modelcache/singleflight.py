"""One download per model: the first caller starts a background pull, later callers join it and wait only
as long as they choose. Across processes the content store's flocks make it one fetch per blob and tree;
within a process this module makes it one pull per (reference, options, credentials). The CSI node service
and the node agent both pull through it."""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from modelcache.cache import ModelCache
from modelcache.credentials import CredentialStore
from modelcache.errors import Kind, ModelCacheError
from modelcache.metrics import PullMetrics
from modelcache.options import PullOptions
from modelcache.progress import Progress
from modelcache.records import PullResult
from modelcache.reference import Reference, parse_reference
from modelcache.registry import RegistryClient
from modelcache.settings import Settings

log = logging.getLogger(__name__)


class PullPending(Exception):
    """The pull goes on in the background; call again to join it."""

    def __init__(self, reference: Reference, progress: Progress) -> None:
        super().__init__(f"pulling {reference} in the background ({progress.describe()}); "
                         f"the next attempt joins the same pull")
        self.progress = progress


@dataclass
class Flight:
    """A pull in progress (or finished): its digest-pinned reference, result and progress."""

    reference: Reference
    future: Future[PullResult]
    progress: Progress
    started: float = field(default_factory=time.monotonic)


class PullFlights:
    """Runs pulls on a bounded pool, one per (reference, options, credentials) at a time."""

    def __init__(self, settings: Settings, *, max_parallel: int = 4, metrics: PullMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache = settings.cache()
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="pull")
        self._flights: dict[tuple[str, str, str], Flight] = {}
        self._lock = threading.Lock()

    def _cache_for(self, credentials: CredentialStore | None) -> ModelCache:
        return self.cache if credentials is None else self.settings.cache(credentials)

    def cached(self, reference: Reference, options: PullOptions) -> PullResult | None:
        """A digest-pinned reference already in the cache (no network)."""
        return self.cache.cached(reference, options)

    def start(self, reference: Reference, options: PullOptions, credentials: CredentialStore | None,
              credentials_id: str) -> Flight:
        """The flight that makes ``reference`` available: a finished one for a cached model, the running
        one for this model, or a new one. A tag is pinned to its digest first (its errors are raised here,
        before any pull starts; the metrics count only pulls)."""
        pinned = reference if reference.digest else self.pin(reference, options, credentials)
        hit = self.cached(pinned, options)
        if hit:
            done: Future[PullResult] = Future()
            done.set_result(hit)
            return Flight(pinned, done, Progress(phase="ready"))
        key = (str(pinned), options.variant(), credentials_id)
        with self._lock:
            flight = self._flights.get(key)
            if flight is None:
                progress = Progress()
                future = self._pool.submit(self._cache_for(credentials).pull, pinned, options, progress)
                flight = Flight(pinned, future, progress)
                self._flights[key] = flight
                future.add_done_callback(functools.partial(self._finished, key, flight))
                log.info("pull of %s started", pinned)
                if self.metrics:
                    self.metrics.started.inc()
        return flight

    def ensure(self, reference: Reference, options: PullOptions, credentials: CredentialStore | None,
               credentials_id: str, wait: float) -> PullResult:
        """Return the pulled model, starting or joining its flight; raise :class:`PullPending` when it is
        not done within ``wait`` seconds, or the pull's own error."""
        flight = self.start(reference, options, credentials, credentials_id)
        try:
            return flight.future.result(timeout=max(wait, 0.0))
        except TimeoutError:
            raise PullPending(flight.reference, flight.progress) from None

    def pin(self, reference: Reference, options: PullOptions, credentials: CredentialStore | None) -> Reference:
        """Pin a tag to its digest; if the registry is unreachable, fall back to the newest cached copy
        of that tag, unless that model needed credentials (access could not be re-checked)."""
        try:
            return reference.with_digest(RegistryClient(self.settings.transport(credentials)).head_digest(reference))
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
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        error = flight.future.exception()
        elapsed = time.monotonic() - flight.started
        if error:
            log.warning("pull of %s failed after %.1f s: %s", key[0], elapsed, error)
        else:
            done = flight.progress.downloaded_bytes
            log.info("pull of %s finished: %d bytes downloaded in %.1f s (%.1f MB/s)", key[0], done, elapsed,
                     done / max(elapsed, 1e-6) / 1e6)
        if self.metrics:
            kind = error.kind.name if isinstance(error, ModelCacheError) else ("INTERNAL" if error else None)
            self.metrics.finished(elapsed, flight.progress.downloaded_bytes, kind)

    def check_access(self, result: PullResult, credentials: CredentialStore | None) -> None:
        """Make sure the caller's own credentials may read a model that needed auth to pull.

        Raises the registry's UNAUTHENTICATED/PERMISSION_DENIED error when they may not; an
        unreachable registry also denies (access cannot be proven).
        """
        if not result.record.auth_required:
            return
        pinned = parse_reference(result.record.reference)
        client = RegistryClient(self.settings.transport(credentials))
        try:
            digest = client.head_digest(pinned)
        except ModelCacheError as exc:
            if exc.kind is Kind.NOT_FOUND:
                raise ModelCacheError(f"access check: {exc}", kind=Kind.PERMISSION_DENIED) from None
            raise
        if str(digest) != result.record.digest:
            raise ModelCacheError("access check: the registry answered a different digest",
                                  kind=Kind.PERMISSION_DENIED)

    def shutdown(self) -> None:
        """Stop accepting pulls; running ones are abandoned (they resume on the next start)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
