"""Prometheus metrics of the CSI driver: operation counts and latency per RPC."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from modelcache.metrics import PullMetrics, serve_metrics


class CsiMetrics:
    """Counts and times every RPC; served on its own port when an address is given."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.operations = Counter("ocimodel_csi_operations", "CSI RPCs by method and gRPC code",
                                  ["method", "code"], registry=self.registry)
        self.latency = Histogram("ocimodel_csi_operation_duration_seconds", "CSI RPC latency", ["method"],
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120),
                                 registry=self.registry)
        self.pulls = PullMetrics(self.registry)
        self.lazy_restores = Counter("ocimodel_csi_lazy_restores", "Lazy volumes whose FUSE helper was gone at "
                                     "start-up, by outcome (bind, helper, failed)", ["outcome"],
                                     registry=self.registry)
        self.integrity_failures = Counter("ocimodel_csi_lazy_integrity_failures", "Lazy volumes whose model failed "
                                          "verification after serving reads (every read then fails)",
                                          registry=self.registry)
        self.tag_resolutions = Counter("ocimodel_csi_tag_resolutions", "Tags of volumes pinned to a digest, by source: "
                                       "modelcache (this node's current revision of a ModelCache that covers the "
                                       "tag; no registry round trip) or registry", ["source"], registry=self.registry)
        self.port = 0

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Record one RPC."""
        self.operations.labels(method=method, code=code).inc()
        self.latency.labels(method=method).observe(seconds)

    def serve(self, address: str) -> None:
        """Serve ``/metrics`` on ``host:port`` in a background thread."""
        server = serve_metrics(address, self.registry, setting="metrics_address", default_host="127.0.0.1")
        self.port = int(server.server_address[1])
