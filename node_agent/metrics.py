"""Prometheus metrics of the node agent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from modelcache.metrics import PullMetrics


class AgentMetrics:
    """One registry per agent, so tests can run several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.cache_bytes = Gauge("ocimodel_cache_bytes", "Bytes on disk in the model cache (shared files once)",
                                 registry=r)
        self.cache_models = Gauge("ocimodel_cache_models", "Models in the cache", registry=r)
        self.cache_blobs = Gauge("ocimodel_cache_blobs", "Blobs in the cache", registry=r)
        self.pulls = PullMetrics(r)
        self.evictions = Counter("ocimodel_evictions", "Models evicted by the watermark", registry=r)
        self.corrupt_blobs = Counter("ocimodel_cache_corrupt_blobs", "Cached blobs found changed by a scheduled "
                                     "verification (bit rot, tampering)", registry=r)
        self.resident_bytes = Gauge("ocimodel_page_cache_resident_bytes",
                                    "Bytes of warmed or pinned models in page cache", registry=r)
        self.locked_bytes = Gauge("ocimodel_page_cache_locked_bytes", "Bytes mlocked by the agent", registry=r)
        self.mounts_in_use = Gauge("ocimodel_mounts_in_use", "Mounts that show a cached model", registry=r)
