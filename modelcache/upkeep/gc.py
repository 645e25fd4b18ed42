"""Cache accounting and garbage collection: disk use, model removal, unreferenced blobs and layers."""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.errors import Kind, ModelCacheError
from modelcache.fsutil import remove_tree
from modelcache.mounts import mounts_of
from modelcache.records import ModelRecord
from modelcache.store.content import blob_lease


@dataclass
class Usage:
    """How much the cache holds: ``logical_bytes`` counts every model in full, ``disk_bytes`` each inode once."""

    models: int = 0
    blobs: int = 0
    layer_bytes: int = 0
    logical_bytes: int = 0
    disk_bytes: int = 0
    per_model: dict[str, int] = field(default_factory=dict)

    @property
    def shared_bytes(self) -> int:
        """Bytes saved by deduplication."""
        return max(0, self.logical_bytes - self.disk_bytes)


def _disk_bytes_not_seen(root: Path, seen: set[tuple[int, int]]) -> int:
    """Disk blocks of the files under ``root`` whose inode is not in ``seen`` (which grows)."""
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_blocks * 512
    return total


def usage(cache: ModelCache) -> Usage:
    """Measure the cache."""
    result = Usage()
    seen: set[tuple[int, int]] = set()
    result.blobs = sum(1 for _ in cache.store.iter_blobs())
    records = cache.records()
    result.models = len(records)
    for record in records:
        result.logical_bytes += record.total_bytes
        result.per_model[record.key] = record.total_bytes
    result.disk_bytes = _disk_bytes_not_seen(cache.store.blobs, seen)
    result.layer_bytes = _disk_bytes_not_seen(cache.store.layers, seen)
    result.disk_bytes += result.layer_bytes
    return result


def in_use(cache: ModelCache, key: str) -> list[str]:
    """Mount points that show the tree of ``key``."""
    return [m.mountpoint for m in mounts_of(cache.tree_path(key))]


def find(cache: ModelCache, text: str) -> list[ModelRecord]:
    """Models matching a key, a digest, or a reference string."""
    return [r for r in cache.records()
            if text in (r.key, r.digest, r.manifest_digest, r.reference) or r.reference.startswith(text + "@")]


class ModelInUse(ModelCacheError):
    """A model that is mounted, or leased by a pull or a publish in progress, cannot be removed now."""

    kind = Kind.INVALID_ARGUMENT


def remove_model(cache: ModelCache, key: str, *, force: bool = False) -> None:
    """Delete a model's tree and record (not its blobs: see :func:`collect_garbage`). Refused with
    :class:`ModelInUse`, without waiting, while a pull or publish holds its lease, or (unless ``force``)
    while it is mounted."""
    with cache.store.claim(f"tree-{key}") as claimed:
        if not claimed:
            raise ModelInUse(f"model {key} is in use by a pull or a publish in progress; try again later")
        users = in_use(cache, key)
        if users and not force:
            raise ModelInUse(f"model {key} is mounted at {', '.join(users)}")
        cache.record_path(key).unlink(missing_ok=True)
        remove_tree(cache.tree_path(key))


@dataclass
class GcReport:
    """What a collection removed (or would remove, on a dry run)."""

    blobs: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    temporary: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def collect_garbage(cache: ModelCache, *, dry_run: bool = False) -> GcReport:
    """Remove blobs and extracted layers no model refers to, and leftovers of interrupted pulls.

    Nothing is locked globally: each candidate is claimed (its lease taken exclusively, without waiting;
    a pull or publish holding it makes gc skip it), then the records are read again, so that a pull that
    wrote its record meanwhile keeps its blobs."""
    report = GcReport()
    store = cache.store
    with contextlib.ExitStack() as claims:
        def claim(name: str) -> bool:
            return bool(claims.enter_context(store.claim(name)))

        live_blobs, live_layers, keys = _live(cache)
        blobs = [(d, p) for d, p in store.iter_blobs() if str(d) not in live_blobs and claim(blob_lease(d))]
        layers = [p for p in (sorted(store.layers.iterdir()) if store.layers.is_dir() else [])
                  if p.name not in live_layers and claim(f"layer-{p.name}")]
        trees = [p for p in (sorted(store.trees.iterdir()) if store.trees.is_dir() else [])
                 if p.name not in keys and claim(f"tree-{_tree_key_of(p.name)}")]
        live_blobs, live_layers, keys = _live(cache)  # what pulls committed before the claims
        for digest, path in blobs:
            if str(digest) not in live_blobs:
                report.blobs.append(str(digest))
                report.freed_bytes += path.stat().st_size
                if not dry_run:
                    store.remove_blob(Digest.parse(str(digest)))
        for layer in layers:
            if layer.name not in live_layers:
                report.layers.append(layer.name)
                report.freed_bytes += _disk_bytes_not_seen(layer, set())
                if not dry_run:
                    remove_tree(layer)
        for tree in trees:
            if tree.name not in keys and not mounts_of(tree):
                report.temporary.append(tree.name)
                if not dry_run:
                    remove_tree(tree)
        for record_file in store.models.glob("*.json"):
            if record_file.stem not in keys and not dry_run and not cache.tree_path(record_file.stem).exists():
                record_file.unlink(missing_ok=True)
    if not dry_run:
        store.clear_partials()
    report.temporary += _orphan_chunk_files(store.root / "lazy", dry_run)
    return report


def _live(cache: ModelCache) -> tuple[set[str], set[str], set[str]]:
    """Blobs, layers and tree keys the complete models refer to."""
    records = cache.records()
    return ({b for r in records for b in r.blobs}, {layer for r in records for layer in r.layers},
            {r.key for r in records})


def _tree_key_of(name: str) -> str:
    """The model key of a directory under ``trees/``: itself, or that of a staging ``.tmp-<key>-<random>``."""
    return name[len(".tmp-"):].rsplit("-", 1)[0] if name.startswith(".tmp-") else name


def _orphan_chunk_files(directory: Path, dry_run: bool) -> list[str]:
    """Chunk files of lazy mounts whose helper is gone (no one holds their lock)."""
    removed = []
    for part in sorted(directory.glob("*.part")) if directory.is_dir() else []:
        fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            removed.append(part.name)
            if not dry_run:
                part.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed
