"""Pull metrics, the same in every process that pulls (the CSI driver and the node agent), so that
summing them across a node's endpoints gives the node's totals; mirror health; serving them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelcache.errors import ListenError
from modelcache.registry.mirrorhealth import MIRRORS, MirrorHealth

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
        registry.register(MirrorCollector(MIRRORS))

    def finished(self, seconds: float, downloaded: int, error: str | None) -> None:
        """Record one pull (``error`` is the failure kind's name, None on success)."""
        if error is None:
            self.succeeded.inc()
            self.bytes.inc(downloaded)
            self.seconds.observe(seconds)
        else:
            self.failed.labels(reason=error).inc()


class MirrorCollector(Collector):
    """``ocimodel_mirror_down_total{mirror}`` (times each mirror went down) and ``ocimodel_mirrors_skipped``
    (mirrors down now), read from ``health`` at each scrape."""

    def __init__(self, health: MirrorHealth) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        """The two metrics, as they are now."""
        down = CounterMetricFamily("ocimodel_mirror_down", "Times a registry mirror was found down (refused or "
                                   "unreachable) and skipped for a while", labels=["mirror"])
        for mirror, count in sorted(self.health.down_counts().items()):
            down.add_metric([mirror], count)
        yield down
        yield GaugeMetricFamily("ocimodel_mirrors_skipped", "Registry mirrors skipped now because they were "
                                "found down", value=self.health.skipped())


def serve_metrics(address: str, registry: CollectorRegistry, *, setting: str, default_host: str) -> WSGIServer:
    """Serve ``/metrics`` of ``registry`` on ``host:port`` (``address``, from the configuration ``setting``)
    in a background thread; :class:`ListenError` when it cannot listen there."""
    host, _, port = address.rpartition(":")
    try:
        server, _ = start_http_server(int(port), addr=host.strip("[]") or default_host, registry=registry)
    except ValueError:
        raise ListenError(address, setting, "not host:port") from None
    except OSError as exc:
        raise ListenError(address, setting, os.strerror(exc.errno) if exc.errno else str(exc)) from None
    return server
