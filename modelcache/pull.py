"""Pulling a reference into the store: resolve, download blobs once, extract, assemble, publish atomically."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from modelcache.digest import Digest, Verifier
from modelcache.errors import Kind, ModelCacheError, StoreFull
from modelcache.fsutil import atomic_write_json, fsync_dir, read_json
from modelcache.layout import Plan, Step, plan_for
from modelcache.manifest import Descriptor
from modelcache.paths import PathFilter
from modelcache.reference import Reference, parse_reference
from modelcache.registry import RegistryClient, Resolved
from modelcache.safetar import extract_tar, make_writable_for_removal
from modelcache.store import ContentStore
from modelcache.tree import TreeBuilder

log = logging.getLogger(__name__)

DEFAULT_EXPAND_RATIO = 100
EXPAND_SLACK = 64 << 20


@dataclass(frozen=True)
class PullOptions:
    """What part of a model to materialise: include/exclude globs and the exposed sub-path."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    subpath: str | None = None

    @property
    def path_filter(self) -> PathFilter:
        """The filter for these globs."""
        return PathFilter(self.include, self.exclude)

    def variant(self) -> str:
        """A short suffix that tells trees of one manifest with different options apart ('' for defaults)."""
        if not self.include and not self.exclude and self.subpath is None:
            return ""
        text = f"{self.path_filter.key()};subpath={self.subpath}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Progress:
    """Thread-safe progress of one pull, readable from other threads."""

    phase: str = "resolving"
    total_bytes: int = 0
    done_bytes: int = 0
    downloaded_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    listeners: list[Callable[[Progress], None]] = field(default_factory=list, repr=False)

    def advance(self, n: int) -> None:
        """Count ``n`` bytes fetched from the network."""
        with self._lock:
            self.done_bytes += n
            self.downloaded_bytes += n
        for listener in self.listeners:
            listener(self)

    def skip(self, n: int) -> None:
        """Count ``n`` bytes that were already on disk (a resumed ingest)."""
        with self._lock:
            self.done_bytes += n

    def set(self, phase: str, total: int | None = None, done: int | None = None) -> None:
        """Move to ``phase``, optionally resetting the byte totals."""
        with self._lock:
            self.phase = phase
            if total is not None:
                self.total_bytes = total
            if done is not None:
                self.done_bytes = done
        for listener in self.listeners:
            listener(self)

    def describe(self) -> str:
        """One line for humans."""
        with self._lock:
            if self.total_bytes:
                pct = 100.0 * self.done_bytes / self.total_bytes
                return f"{self.phase}: {self.done_bytes}/{self.total_bytes} bytes ({pct:.1f}%)"
            return self.phase


@dataclass
class ModelRecord:
    """What the store knows of one assembled tree; kept as ``models/<key>.json``."""

    key: str
    reference: str
    digest: str
    manifest_digest: str
    layout: str
    files: int
    total_bytes: int
    blobs: list[str]
    layers: list[str]
    subpath: str
    include: list[str]
    exclude: list[str]
    created: float
    auth_required: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelRecord:
        """Rebuild from the stored JSON."""
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class PullResult:
    """The outcome of a pull."""

    record: ModelRecord
    path: Path
    downloaded_bytes: int
    cached: bool
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The JSON the CLI prints."""
        return {"reference": self.record.reference, "digest": self.record.digest,
                "manifest_digest": self.record.manifest_digest, "layout": self.record.layout,
                "path": str(self.path), "total_bytes": self.record.total_bytes,
                "downloaded_bytes": self.downloaded_bytes, "files": self.record.files, "cached": self.cached,
                "seconds": round(self.seconds, 3)}


def tree_key(digest: Digest, options: PullOptions) -> str:
    """The directory name of the tree for ``digest`` with ``options``."""
    variant = options.variant()
    return f"{digest.algorithm}-{digest.hex}" + (f"-{variant}" if variant else "")


class ModelCache:
    """The node's model cache: pulls references into ``store`` through ``client``."""

    def __init__(self, store: ContentStore, client: RegistryClient | None = None, *, workers: int = 4,
                 expand_ratio: int = DEFAULT_EXPAND_RATIO) -> None:
        self.store = store
        self.client = client or RegistryClient()
        self.workers = workers
        self.expand_ratio = expand_ratio
        store.ensure()

    # -- lookups ----------------------------------------------------------------------------------------
    def record_path(self, key: str) -> Path:
        """Where the record of ``key`` lives."""
        return self.store.models / f"{key}.json"

    def tree_path(self, key: str) -> Path:
        """Where the tree of ``key`` lives."""
        return self.store.trees / key

    def get_record(self, key: str) -> ModelRecord | None:
        """The record of ``key`` if both it and its tree exist."""
        data = read_json(self.record_path(key))
        if not isinstance(data, dict) or not self.tree_path(key).is_dir():
            return None
        try:
            return ModelRecord.from_json(data)
        except TypeError:
            return None

    def records(self) -> list[ModelRecord]:
        """Every complete model in the cache."""
        result = []
        for path in sorted(self.store.models.glob("*.json")):
            record = self.get_record(path.stem)
            if record:
                result.append(record)
        return result

    def exposed_path(self, record: ModelRecord) -> Path:
        """The directory handed to users: the tree, or its sub-path."""
        base = self.tree_path(record.key)
        if record.subpath and record.layout != "image":
            return base / record.subpath
        return base

    def last_used(self, key: str) -> float:
        """When ``key`` was last pulled or used (mtime of its record)."""
        try:
            return self.record_path(key).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def touch(self, key: str) -> None:
        """Mark ``key`` as used now."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.record_path(key))

    def _hit(self, key: str, started: float) -> PullResult | None:
        record = self.get_record(key)
        if record is None:
            return None
        self.touch(key)
        return PullResult(record, self.exposed_path(record), 0, True, time.monotonic() - started)

    # -- pulling ----------------------------------------------------------------------------------------
    def cached(self, reference: str | Reference, options: PullOptions = PullOptions()) -> PullResult | None:
        """A digest reference already in the cache, without touching the network; else None."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        if ref.digest is None:
            return None
        return self._hit(tree_key(ref.digest, options), time.monotonic())

    def pull(self, reference: str | Reference, options: PullOptions = PullOptions(),
             progress: Progress | None = None) -> PullResult:
        """Make ``reference`` available as a tree; pull what is missing. Safe to call concurrently."""
        started = time.monotonic()
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        progress = progress or Progress()
        hit = self.cached(ref, options)
        if hit:
            return hit
        digest = ref.digest or self.client.head_digest(ref)
        hit = self._hit(tree_key(digest, options), started)
        if hit:
            return hit
        resolved = self.client.resolve(ref.with_digest(digest))
        return self.materialise(resolved, options, progress, started)

    def materialise(self, resolved: Resolved, options: PullOptions, progress: Progress,
                    started: float | None = None) -> PullResult:
        """Build the tree for an already resolved manifest."""
        started = time.monotonic() if started is None else started
        key = tree_key(resolved.digest, options)
        plan = plan_for(resolved.manifest, options.subpath)
        with self.store.lock("gc", shared=True), self.store.lock(f"tree-{key}"):
            hit = self._hit(key, started)
            if hit:
                return hit
            ref = resolved.reference
            manifest = resolved.manifest
            self.store.put_bytes(manifest.digest, manifest.raw)
            if not self.store.has_blob(manifest.config.digest, manifest.config.size):
                self.store.put_bytes(manifest.config.digest, self.client.get_small_blob(ref, manifest.config))
            steps = plan.needed(options.path_filter)
            self._download(ref, [s.descriptor for s in steps], progress)
            layer_dirs = self._extract(plan, steps, progress)
            progress.set("assembling")
            stats_record = self._assemble(key, plan, steps, layer_dirs, options)
            record = ModelRecord(
                key=key, reference=str(ref), digest=str(resolved.digest), manifest_digest=str(manifest.digest),
                layout=plan.layout, files=stats_record[0], total_bytes=stats_record[1],
                blobs=sorted({str(manifest.digest), str(manifest.config.digest)} |
                             {str(s.descriptor.digest) for s in steps}),
                layers=sorted({p.name for p in layer_dirs.values()}), subpath=plan.subpath,
                include=list(options.include), exclude=list(options.exclude), created=time.time(),
                auth_required=self._auth_required(ref))
            atomic_write_json(self.record_path(key), asdict(record))
            progress.set("ready")
            elapsed = time.monotonic() - started
            return PullResult(record, self.exposed_path(record), progress.downloaded_bytes, False, elapsed)

    def _auth_required(self, ref: Reference) -> bool:
        """True when talking to ``ref``'s registry needed credentials (cache hits must re-check access)."""
        return self.client.transport.used_auth(ref.endpoint_host)

    def _download(self, ref: Reference, descriptors: list[Descriptor], progress: Progress) -> None:
        unique: dict[Digest, Descriptor] = {}
        for descriptor in descriptors:
            unique.setdefault(descriptor.digest, descriptor)
        missing = [d for d in unique.values() if not self.store.has_blob(d.digest, d.size)]
        total = sum(d.size for d in unique.values())
        progress.set("downloading", total=total, done=total - sum(d.size for d in missing))
        need = sum(d.size - self._partial_size(d.digest) for d in missing)
        free = shutil.disk_usage(self.store.root).free
        if need > free:
            raise StoreFull(f"{ref}: needs {need} more bytes but the cache has {free} free")
        if not missing:
            return

        def fetch_one(descriptor: Descriptor) -> None:
            def fetch(out: IO[bytes], verifier: Verifier) -> None:
                progress.skip(verifier.count)
                self.client.download_blob(ref, descriptor, out, verifier, progress.advance)
            self.store.ingest(descriptor.digest, descriptor.size, fetch)

        if len(missing) == 1:
            fetch_one(missing[0])
            return
        with ThreadPoolExecutor(max_workers=min(self.workers, len(missing)),
                                thread_name_prefix="blob") as pool:
            futures = [pool.submit(fetch_one, d) for d in sorted(missing, key=lambda d: -d.size)]
            errors = []
            for future in futures:
                try:
                    future.result()
                except Exception as exc:  # noqa: BLE001 - re-raised below, first one wins
                    errors.append(exc)
            if errors:
                raise errors[0]

    def _partial_size(self, digest: Digest) -> int:
        try:
            return self.store.partial_path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def _extract(self, plan: Plan, steps: list[Step], progress: Progress) -> dict[tuple[str, str], Path]:
        """Extract each tar layer once per (digest, prefix) into ``layers/``; return their directories."""
        result: dict[tuple[str, str], Path] = {}
        tar_steps = [s for s in steps if s.compression.is_tar]
        if tar_steps:
            progress.set("extracting")
        for step in tar_steps:
            digest = step.descriptor.digest
            suffix = f"-p{hashlib.sha256(step.prefix.encode()).hexdigest()[:12]}" if step.prefix else ""
            name = f"{digest.algorithm}-{digest.hex}{suffix}"
            target = self.store.layers / name
            result[(str(digest), step.prefix)] = target
            if target.is_dir():
                continue
            with self.store.lock(f"layer-{name}"):
                if target.is_dir():
                    continue
                staging = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=self.store.layers))
                try:
                    limit = step.descriptor.size * self.expand_ratio + EXPAND_SLACK
                    limit = min(limit, shutil.disk_usage(self.store.root).free)
                    extract_tar(self.store.blob_path(digest), step.compression, staging, max_bytes=limit,
                                prefix=step.prefix, what=f"layer {digest}")
                    os.rename(staging, target)
                    fsync_dir(self.store.layers)
                except BaseException:
                    remove_tree(staging)
                    raise
        return result

    def _assemble(self, key: str, plan: Plan, steps: list[Step], layer_dirs: dict[tuple[str, str], Path],
                  options: PullOptions) -> tuple[int, int]:
        for stale in self.store.trees.glob(f".tmp-{key}-*"):
            remove_tree(stale)
        final = self.tree_path(key)
        if final.exists():
            remove_tree(final)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.store.trees))
        try:
            builder = TreeBuilder(staging, options.path_filter)
            for step in steps:
                if step.compression.is_tar:
                    builder.overlay(layer_dirs[(str(step.descriptor.digest), step.prefix)], step.dest)
                else:
                    builder.add_file(step.dest, self.store.blob_path(step.descriptor.digest))
            if plan.layout == "image" and not any(staging.iterdir()):
                raise ModelCacheError(f"the image has nothing under /{plan.subpath}; set the path to the "
                                      f"directory that holds the model", kind=Kind.NOT_FOUND)
            if plan.layout != "image" and plan.subpath and not (staging / plan.subpath).is_dir():
                raise ModelCacheError(f"path {plan.subpath!r} is not a directory in the model", kind=Kind.NOT_FOUND)
            stats = builder.finish()
            os.chmod(staging, 0o555)
            os.rename(staging, final)
            fsync_dir(self.store.trees)
        except BaseException:
            remove_tree(staging)
            raise
        return stats.files, stats.bytes


def remove_tree(path: Path) -> None:
    """Delete a read-only tree (directories are made writable first)."""
    if not os.path.lexists(path):
        return
    make_writable_for_removal(path)
    shutil.rmtree(path, ignore_errors=False)

