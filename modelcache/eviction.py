"""Eviction by disk watermarks: least-recently-used models first, never a mounted or pinned one;
their blobs go once no remaining model refers to them."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass, field

from modelcache.cache import ModelCache
from modelcache.gc import ModelInUse, collect_garbage, in_use, remove_model
from modelcache.pins import Pins
from modelcache.records import ModelRecord

log = logging.getLogger(__name__)


@dataclass
class EvictionResult:
    """What an eviction pass did (or would do, on a dry run)."""

    used_fraction_before: float
    used_fraction_after: float
    evicted: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    blocked: list[str] = field(default_factory=list)


def _used_fraction(cache: ModelCache) -> tuple[float, int, int]:
    usage = shutil.disk_usage(cache.store.root)
    used = usage.total - usage.free
    return used / usage.total, used, usage.total


def _bytes_only_it_holds(record: ModelRecord, refcount: Counter[str], cache: ModelCache) -> int:
    """Bytes of the blobs no model but ``record`` refers to (freed when it goes)."""
    total = 0
    for digest in record.blobs:
        if refcount[digest] == 1:
            algorithm, _, hexpart = digest.partition(":")
            path = cache.store.blobs / algorithm / hexpart
            if path.exists():
                total += path.stat().st_size
    return total


def evict(cache: ModelCache, *, high: float, low: float, protected: set[str] | None = None,
          dry_run: bool = False) -> EvictionResult:
    """If the cache's filesystem is fuller than ``high``, evict LRU models until it is under ``low``."""
    fraction, used, total = _used_fraction(cache)
    result = EvictionResult(fraction, fraction)
    if fraction <= high:
        return result
    keep = set(protected or ()) | Pins(cache.store.root).pinned()
    records = sorted(cache.records(), key=lambda r: cache.last_used(r.key))
    refcount: Counter[str] = Counter(b for r in records for b in r.blobs)
    target = low * total
    projected = used
    for record in records:
        if projected <= target:
            break
        if record.key in keep or in_use(cache, record.key):
            result.blocked.append(record.key)
            continue
        freed = _bytes_only_it_holds(record, refcount, cache)
        if not dry_run:
            try:
                remove_model(cache, record.key)
            except ModelInUse:  # a publish or pull holds its lease, or mounted it since the listing
                result.blocked.append(record.key)
                continue
            log.info("evicted %s (%s), %d bytes", record.key, record.reference, freed)
        for digest in record.blobs:
            refcount[digest] -= 1
        projected -= freed
        result.freed_bytes += freed
        result.evicted.append(record.key)
    if result.evicted and not dry_run:
        collect_garbage(cache)
    result.used_fraction_after = _used_fraction(cache)[0] if not dry_run else projected / total
    if projected > target and result.blocked:
        log.warning("cache still above the low watermark: %d models are mounted or pinned", len(result.blocked))
    return result


def make_room(cache: ModelCache, needed: int, low: float) -> EvictionResult:
    """A pull lacks ``needed`` bytes (0: unknown): evict least-recently-used models (never a mounted, pinned
    or leased one) until that much is free, and at least down to the ``low`` watermark."""
    usage = shutil.disk_usage(cache.store.root)
    target = min(low * usage.total, usage.total - usage.free - needed) if needed else low * usage.total
    result = evict(cache, high=-1.0, low=max(target, 0) / usage.total)
    log.warning("cache full: evicted %d models (%d bytes) for a pull that needs %d more bytes", len(result.evicted),
                result.freed_bytes, needed)
    return result
