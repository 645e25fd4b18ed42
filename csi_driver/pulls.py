"""Background pulls that outlive any one RPC: the first caller starts a pull, later callers join it,
and each waits only a bounded time before getting a retriable answer with the progress."""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from csi_driver.metrics import CsiMetrics
from modelcache.credentials import CredentialStore
from modelcache.errors import Kind, ModelCacheError
from modelcache.pull import ModelCache, Progress, PullOptions, PullResult
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
class _Job:
    future: Future[PullResult]
    progress: Progress
    started: float = field(default_factory=time.monotonic)


class PullManager:
    """Runs pulls on a bounded pool, one per (reference, options, credentials) at a time."""

    def __init__(self, settings: Settings, *, max_parallel: int = 4, metrics: CsiMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.cache = settings.cache()
        self._pool = ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="pull")
        self._jobs: dict[tuple[str, str, str], _Job] = {}
        self._lock = threading.Lock()

    def _cache_for(self, credentials: CredentialStore | None) -> ModelCache:
        return self.cache if credentials is None else self.settings.cache(credentials)

    def cached(self, reference: Reference, options: PullOptions) -> PullResult | None:
        """A digest-pinned reference already in the cache (no network)."""
        return self.cache.cached(reference, options)

    def ensure(self, reference: Reference, options: PullOptions, credentials: CredentialStore | None,
               credentials_id: str, wait: float) -> PullResult:
        """Return the pulled model, starting or joining a background pull; raise :class:`PullPending`
        when it is not done within ``wait`` seconds, or the pull's own error."""
        if reference.digest is None:
            reference = self.pin(reference, options, credentials)
        hit = self.cached(reference, options)
        if hit:
            return hit
        key = (str(reference), options.variant(), credentials_id)
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                progress = Progress()
                cache = self._cache_for(credentials)
                future = self._pool.submit(cache.pull, reference, options, progress)
                job = _Job(future, progress)
                self._jobs[key] = job
                future.add_done_callback(functools.partial(self._finished, key, job))
                log.info("pull of %s started", reference)
                if self.metrics:
                    self.metrics.pulls.started.inc()
        try:
            return job.future.result(timeout=max(wait, 0.0))
        except TimeoutError:
            raise PullPending(reference, job.progress) from None

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

    def _finished(self, key: tuple[str, str, str], job: _Job, _future: object = None) -> None:
        with self._lock:
            if self._jobs.get(key) is job:
                del self._jobs[key]
        error = job.future.exception()
        elapsed = time.monotonic() - job.started
        if error:
            log.warning("pull of %s failed after %.1f s: %s", key[0], elapsed, error)
        else:
            done = job.progress.downloaded_bytes
            log.info("pull of %s finished: %d bytes downloaded in %.1f s (%.1f MB/s)", key[0], done, elapsed,
                     done / max(elapsed, 1e-6) / 1e6)
        if self.metrics:
            kind = error.kind.name if isinstance(error, ModelCacheError) else ("INTERNAL" if error else None)
            self.metrics.pulls.finished(elapsed, job.progress.downloaded_bytes, kind)

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
