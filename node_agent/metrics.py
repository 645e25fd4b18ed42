"""Prometheus metrics of the node agent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class AgentMetrics:
    """One registry per agent, so tests can run several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cache_bytes = Gauge("ocimodel_cache_bytes", "Bytes on disk in the model cache (shared files once)",
                                 registry=r)
        self.cache_models = Gauge("ocimodel_cache_models", "Models in the cache", registry=r)
        self.cache_blobs = Gauge("ocimodel_cache_blobs", "Blobs in the cache", registry=r)
        self.pulls_started = Counter("ocimodel_pulls_started", "Pulls started by the agent", registry=r)
        self.pulls_succeeded = Counter("ocimodel_pulls_succeeded", "Pulls that finished", registry=r)
        self.pulls_failed = Counter("ocimodel_pulls_failed", "Pulls that failed", ["reason"], registry=r)
        self.bytes_pulled = Counter("ocimodel_pulled_bytes", "Bytes downloaded from registries", registry=r)
        self.pull_seconds = Histogram("ocimodel_pull_duration_seconds", "Pull duration",
                                      buckets=(0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), registry=r)
        self.evictions = Counter("ocimodel_evictions", "Models evicted by the watermark", registry=r)
        self.resident_bytes = Gauge("ocimodel_page_cache_resident_bytes",
                                    "Bytes of warmed or pinned models in page cache", registry=r)
        self.locked_bytes = Gauge("ocimodel_page_cache_locked_bytes", "Bytes mlocked by the agent", registry=r)
        self.mounts_in_use = Gauge("ocimodel_mounts_in_use", "Mounts that show a cached model", registry=r)
