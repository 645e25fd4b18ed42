"""Eviction by disk watermarks: least-recently-used models first, never a mounted or pinned one;
their blobs and extracted layers go once no remaining model refers to them. A pull short of space evicts
only when that can make room: never for a need larger than the cache could ever hold."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field

from modelcache.cache import ModelCache
from modelcache.errors import StoreFull
from modelcache.records import ModelRecord
from modelcache.upkeep.gc import ModelInUse, collect_garbage, in_use, remove_model
from modelcache.upkeep.pins import Pins

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


def _held(record: ModelRecord) -> list[str]:
    """What ``record`` keeps in the cache: its blobs (by digest) and extracted layers (``layer:<name>``)."""
    return [*record.blobs, *(f"layer:{name}" for name in record.layers)]


def _size(cache: ModelCache, item: str) -> int:
    """Bytes of one blob, or of the files of one extracted layer."""
    if item.startswith("layer:"):
        total = 0
        for dirpath, _, filenames in os.walk(cache.store.layers / item.removeprefix("layer:")):
            total += sum(os.lstat(os.path.join(dirpath, name)).st_size for name in filenames)
        return total
    algorithm, _, hexpart = item.partition(":")
    path = cache.store.blobs / algorithm / hexpart
    return path.stat().st_size if path.exists() else 0


def _bytes_only_it_holds(record: ModelRecord, refcount: Counter[str], cache: ModelCache) -> int:
    """Bytes of the blobs and layers no model but ``record`` refers to (freed when it goes)."""
    return sum(_size(cache, item) for item in _held(record) if refcount[item] == 1)


def evict(cache: ModelCache, *, high: float, low: float, protected: set[str] | None = None,
          dry_run: bool = False) -> EvictionResult:
    """If the cache's filesystem is fuller than ``high``, evict LRU models until it is under ``low``."""
    fraction, used, total = _used_fraction(cache)
    result = EvictionResult(fraction, fraction)
    if fraction <= high:
        return result
    keep = set(protected or ()) | Pins(cache.store.root).pinned()
    records = sorted(cache.records(), key=lambda r: cache.last_used(r.key))
    refcount: Counter[str] = Counter(item for r in records for item in _held(r))
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
        for item in _held(record):
            refcount[item] -= 1
        projected -= freed
        result.freed_bytes += freed
        result.evicted.append(record.key)
    if result.evicted and not dry_run:
        collect_garbage(cache)
    result.used_fraction_after = _used_fraction(cache)[0] if not dry_run else projected / total
    if projected > target and result.blocked and not dry_run:
        log.warning("cache still above the low watermark: %d models are mounted or pinned", len(result.blocked))
    return result


def make_room(cache: ModelCache, needed: int, low: float, what: str = "a pull") -> EvictionResult:
    """``what`` (a pull) lacks ``needed`` bytes (0: unknown): evict least-recently-used models (never a mounted,
    pinned or leased one) until that much is free, and at least down to the ``low`` watermark. When evicting
    every model that may go would still not free ``needed`` bytes, evict nothing: raise :class:`StoreFull`."""
    if needed:
        possible = evict(cache, high=-1.0, low=0.0, dry_run=True).freed_bytes
        if needed > possible:
            raise StoreFull(f"{what}; that is more than the cache could ever hold: evicting every model that may go "
                            f"would free only {possible} bytes, so none was evicted", needed=needed)
    usage = shutil.disk_usage(cache.store.root)
    target = min(low * usage.total, usage.total - usage.free - needed) if needed else low * usage.total
    result = evict(cache, high=-1.0, low=max(target, 0) / usage.total)
    log.warning("cache full: evicted %d models (%d bytes) for a pull that needs %d more bytes", len(result.evicted),
                result.freed_bytes, needed)
    return result
