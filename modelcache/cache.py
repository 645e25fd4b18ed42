"""The node's model cache: lookups of assembled models, and pulls that make a reference available as a
tree (resolve, then the steps in :mod:`modelcache.assemble.pull`), safe to run concurrently across processes."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from modelcache.assemble.layout import Plan, Step, needs_config, plan_for
from modelcache.assemble.options import PullOptions
from modelcache.assemble.pull import assemble_tree, download_blobs, extract_layers, layer_name
from modelcache.errors import UnsafeContent
from modelcache.fsutil import atomic_write_json, read_json, remove_tree
from modelcache.progress import Progress
from modelcache.records import ModelRecord, PullResult, tree_key
from modelcache.registry.access import is_private
from modelcache.registry.client import MAX_CONFIG_BYTES, RegistryClient, Resolved
from modelcache.registry.reference import Reference, parse_reference
from modelcache.store.content import ContentStore, blob_lease

log = logging.getLogger(__name__)

DEFAULT_EXPAND_RATIO = 100
DEFAULT_CONNECTIONS = 8  # concurrent Range requests per large blob
DEFAULT_RANGED_MIN_SIZE = 64 << 20  # blobs at least this large are fetched in ranges
DEFAULT_MAX_MODEL_BYTES = 1 << 40  # 1 TiB: a 405B-parameter model in bf16 is about 810 GB
DEFAULT_MAX_MODEL_FILES = 100_000  # files, directories and links of one model, across its layers
TreeCheck = Callable[[Path], object]  # run on a tree before it is used; raises to refuse it


class ModelCache:
    """The node's model cache: pulls references into ``store`` through ``client``."""

    def __init__(self, store: ContentStore, client: RegistryClient | None = None, *, workers: int = 4,
                 expand_ratio: int = DEFAULT_EXPAND_RATIO, connections_per_blob: int = DEFAULT_CONNECTIONS,
                 ranged_min_size: int = DEFAULT_RANGED_MIN_SIZE,
                 max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES, max_model_files: int = DEFAULT_MAX_MODEL_FILES
                 ) -> None:
        self.store = store
        self.client = client or RegistryClient()
        self.workers = workers
        self.expand_ratio = expand_ratio
        self.connections_per_blob = connections_per_blob
        self.ranged_min_size = ranged_min_size
        self.max_model_bytes = max_model_bytes
        self.max_model_files = max_model_files
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
        """A digest reference already in the cache, without touching the network; else None. Knows no
        signature policy (trees are kept per digest, whatever name pulled them): a caller serving the tree
        checks the policy for ``reference`` first, as :meth:`PullFlights.cached` and ``ocimodel pull`` do."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        if ref.digest is None:
            return None
        return self._hit(tree_key(ref.digest, options), time.monotonic())

    def pull(self, reference: str | Reference, options: PullOptions = PullOptions(),
             progress: Progress | None = None, cancel: threading.Event | None = None,
             check_tree: TreeCheck | None = None) -> PullResult:
        """Make ``reference`` available as a tree; pull what is missing. Safe to call concurrently. Setting
        ``cancel`` stops the downloads at their next read (:class:`PullCancelled`), resumable later.
        ``check_tree`` (a signature over the files) runs on the tree before it is returned; a tree it
        refuses is removed when this pull built it."""
        started = time.monotonic()
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        progress = progress or Progress()
        hit = self.cached(ref, options)
        if hit is None:
            digest = ref.digest or self.client.head_digest(ref)
            hit = self._hit(tree_key(digest, options), started)
            if hit is None:
                resolved = self.client.resolve(ref.with_digest(digest))
                return self.materialise(resolved, options, progress, started, cancel, check_tree)
        if check_tree is not None:
            check_tree(self.store.trees / hit.record.key)
        return hit

    def materialise(self, resolved: Resolved, options: PullOptions, progress: Progress,
                    started: float | None = None, cancel: threading.Event | None = None,
                    check_tree: TreeCheck | None = None) -> PullResult:
        """Build the tree for an already resolved manifest. Leases on the tree, its blobs and layers keep
        gc, eviction and ``cache rm`` away from them until the record is written (nothing else waits).
        ``check_tree`` as for :meth:`pull`."""
        started = time.monotonic() if started is None else started
        key = tree_key(resolved.digest, options)
        plan = self.plan(resolved, options)
        steps = plan.needed(options.path_filter)
        self.check_declared_size(resolved, options, plan)
        manifest = resolved.manifest
        leases = [f"tree-{key}", blob_lease(manifest.digest), blob_lease(manifest.config.digest),
                  *(blob_lease(s.descriptor.digest) for s in steps),
                  *(f"layer-{layer_name(s)}" for s in steps if s.compression.is_tar)]
        with self.store.lease(*leases), self.store.lock(f"tree-{key}"):
            hit = self._hit(key, started)
            if hit:
                if check_tree is not None:
                    check_tree(self.store.trees / key)
                return hit
            ref = resolved.reference
            self.store.put_bytes(manifest.digest, manifest.raw)
            if not self.store.has_blob(manifest.config.digest, manifest.config.size):
                self.store.put_bytes(manifest.config.digest, self.client.get_small_blob(ref, manifest.config))
            self.store_synthesized(plan, steps)
            download_blobs(self.store, self.client, ref, [s.descriptor for s in steps], progress, self.workers,
                           cancel, connections=self.connections_per_blob, ranged_min_size=self.ranged_min_size)
            layer_dirs = extract_layers(self.store, steps, progress, self.expand_ratio,
                                        max_bytes=self.max_model_bytes, max_files=self.max_model_files)
            progress.set("assembling")
            stats_record = assemble_tree(self.store, key, plan, steps, layer_dirs, options)
            if check_tree is not None:
                progress.set("verifying signature")
                try:
                    check_tree(self.store.trees / key)
                except BaseException:
                    remove_tree(self.store.trees / key)  # refused: nothing of it stays in the cache
                    raise
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

    def plan(self, resolved: Resolved, options: PullOptions) -> Plan:
        """The plan of ``resolved`` narrowed to ``options``' layer kinds; a ModelKit's config (its Kitfile, a
        small blob) is fetched for it, and kept, when the store lacks it."""
        manifest = resolved.manifest
        config = None
        if needs_config(manifest):
            if manifest.config.size <= MAX_CONFIG_BYTES and self.store.has_blob(manifest.config.digest,
                                                                                 manifest.config.size):
                config = self.store.blob_path(manifest.config.digest).read_bytes()
            else:
                config = self.client.get_small_blob(resolved.reference, manifest.config)
                self.store.put_bytes(manifest.config.digest, config)
        return plan_for(manifest, options.subpath, config=config, layers=options.layers)

    def store_synthesized(self, plan: Plan, steps: list[Step]) -> None:
        """Commit the blobs ``plan`` made itself (a ModelKit's Kitfile) that ``steps`` use, like fetched ones."""
        for step in steps:
            data = plan.synthesized.get(step.descriptor.digest)
            if data is not None and not self.store.has_blob(step.descriptor.digest, len(data)):
                self.store.put_bytes(step.descriptor.digest, data)

    def check_declared_size(self, resolved: Resolved, options: PullOptions, plan: Plan | None = None) -> None:
        """Refuse a model whose layers (those ``options`` keep) declare more than ``max_model_bytes`` in all,
        before anything is downloaded or evicted for it: a manifest may declare any size."""
        steps = (plan or self.plan(resolved, options)).needed(options.path_filter)
        declared = sum({s.descriptor.digest: s.descriptor.size for s in steps}.values())
        if declared > self.max_model_bytes:
            gib, limit_gib = declared / (1 << 30), self.max_model_bytes / (1 << 30)
            raise UnsafeContent(f"{resolved.reference}: its layers declare {declared} bytes ({gib:.1f} GiB) in "
                                f"all, more than this node's limit of {self.max_model_bytes} bytes "
                                f"(maxModelGiB {limit_gib:g})")

    def _auth_required(self, ref: Reference) -> bool:
        """True when ``ref`` is private at its upstream (cache hits must re-check access there)."""
        return is_private(self.client.transport, ref)
