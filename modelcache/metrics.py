"""Pull metrics, the same in every process that pulls (the CSI driver and the node agent), so that
summing them across a node's endpoints gives the node's totals."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

PULL_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)


class PullMetrics:
    """Counters and a duration histogram of pulls, in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter("ocimodel_pulls_started", "Pulls started", registry=registry)
        self.succeeded = Counter("ocimodel_pulls_succeeded", "Pulls that finished", registry=registry)
        self.failed = Counter("ocimodel_pulls_failed", "Pulls that failed", ["reason"], registry=registry)
        self.bytes = Counter("ocimodel_pulled_bytes", "Bytes downloaded from registries", registry=registry)
        self.seconds = Histogram("ocimodel_pull_duration_seconds", "Pull duration", buckets=PULL_BUCKETS,
                                 registry=registry)

    def finished(self, seconds: float, downloaded: int, error: str | None) -> None:
        """Record one pull (``error`` is the failure kind's name, None on success)."""
        if error is None:
            self.succeeded.inc()
            self.bytes.inc(downloaded)
            self.seconds.observe(seconds)
        else:
            self.failed.labels(reason=error).inc()
