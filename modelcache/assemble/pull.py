"""The steps of a pull: download the blobs a model needs (verified, once), extract its tar layers once,
and assemble its tree from hardlinks, published atomically. :class:`modelcache.cache.ModelCache` runs them."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from modelcache.assemble import fdtree
from modelcache.assemble.extract import extract_tar
from modelcache.assemble.layout import Plan, Step
from modelcache.assemble.options import PullOptions
from modelcache.assemble.tree import TreeBuilder
from modelcache.assemble.treerules import Budget
from modelcache.digest import Digest, Verifier
from modelcache.errors import IntegrityError, Kind, ModelCacheError, PullCancelled, RangesUnsupported, StoreFull
from modelcache.fsutil import fsync_dir
from modelcache.progress import Progress
from modelcache.registry.client import RegistryClient
from modelcache.registry.manifest import Descriptor
from modelcache.registry.reference import Reference
from modelcache.store.content import ContentStore

log = logging.getLogger(__name__)

SMALL_BLOB = 1 << 20  # a blob smaller than this costs round trips and fsyncs rather than bandwidth
SMALL_BLOB_WORKERS = 16  # small blobs fetched at a time, besides the ``workers`` large ones


def download_blobs(store: ContentStore, client: RegistryClient, ref: Reference, descriptors: list[Descriptor],
                   progress: Progress, workers: int, cancel: threading.Event | None = None, *,
                   connections: int = 1, ranged_min_size: int = 0) -> None:
    """Download every blob of ``descriptors`` the store lacks (verified, resumable, ``workers`` blobs at a
    time and SMALL_BLOB_WORKERS small ones besides; a blob of at least ``ranged_min_size`` bytes over
    ``connections`` concurrent Range requests).
    Once ``cancel`` is set, each download stops at its next read, its partial file kept for resuming.
    Declared sizes are not trusted to free space: a download runs into the free space, and a full disk
    raises :class:`StoreFull` with the bytes still to come (the partial file kept), for eviction to make room
    for bytes that arrived."""

    def on_bytes(n: int) -> None:
        if cancel is not None and cancel.is_set():
            raise PullCancelled(f"{ref}: pull stopped for shutdown; it resumes on the next start")
        progress.advance(n)

    unique: dict[Digest, Descriptor] = {}
    for descriptor in descriptors:
        unique.setdefault(descriptor.digest, descriptor)
    missing = [d for d in unique.values() if not store.has_blob(d.digest, d.size)]
    absent = {d.digest for d in missing}
    for descriptor in unique.values():
        if descriptor.digest not in absent:
            store.served.settle(descriptor.digest)  # its committer may have died before comparing
    total = sum(d.size for d in unique.values())
    progress.set("downloading", total=total, done=total - sum(d.size for d in missing))
    need = sum(d.size - _partial_size(store, d.digest) for d in missing)
    usage = shutil.disk_usage(store.root)
    if need > usage.total:  # no eviction could make room; a smaller need evicts only as its bytes arrive
        raise StoreFull(f"{ref}: declares {need} more bytes, more than the cache's whole filesystem "
                        f"({usage.total} bytes)", needed=need - usage.free)
    if not missing:
        return

    def fetch_one(descriptor: Descriptor) -> None:
        if connections > 1 and descriptor.size >= ranged_min_size and not _partial_size(store, descriptor.digest):
            try:
                def fetch_range(start: int, length: int, write: Callable[[int, memoryview], None]) -> None:
                    client.download_range(ref, descriptor.digest, descriptor.size, start, length, write)
                progress.skip(store.ingest_ranged(descriptor.digest, descriptor.size, fetch_range,
                                                  workers=connections, on_bytes=on_bytes))
                return
            except RangesUnsupported:
                log.info("%s: no Range support; fetching blob %s as one stream", ref, descriptor.digest)
            except IntegrityError as exc:  # a cache in front that answers ranges wrongly: whole GETs may be right
                log.warning("%s: %s; fetching blob %s again as one stream", ref, exc, descriptor.digest)

        def fetch(out: IO[bytes], verifier: Verifier) -> None:
            progress.skip(verifier.count)
            client.download_blob(ref, descriptor, out, verifier, on_bytes)
        store.ingest(descriptor.digest, descriptor.size, fetch)

    if len(missing) == 1:
        fetch_one(missing[0])
        return
    large = sorted((d for d in missing if d.size >= SMALL_BLOB), key=lambda d: -d.size)
    small = [d for d in missing if d.size < SMALL_BLOB]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(large))), thread_name_prefix="blob") as pool, \
            ThreadPoolExecutor(max_workers=max(1, min(SMALL_BLOB_WORKERS, len(small))),
                               thread_name_prefix="small-blob") as small_pool:
        futures = [pool.submit(fetch_one, d) for d in large] + [small_pool.submit(fetch_one, d) for d in small]
        errors = []
        for future in futures:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - re-raised below, first one wins
                errors.append(exc)
        if errors:
            raise errors[0]


def _partial_size(store: ContentStore, digest: Digest) -> int:
    try:
        return store.partial_path(digest).stat().st_size
    except FileNotFoundError:
        return 0


def layer_name(step: Step) -> str:
    """The directory under ``layers/`` that holds a tar layer extracted for ``step`` (digest and prefix)."""
    digest = step.descriptor.digest
    suffix = f"-p{hashlib.sha256(step.prefix.encode()).hexdigest()[:12]}" if step.prefix else ""
    return f"{digest.algorithm}-{digest.hex}{suffix}"


def extract_layers(store: ContentStore, steps: list[Step], progress: Progress, expand_ratio: int, *,
                   max_bytes: int, max_files: int) -> dict[tuple[str, str], Path]:
    """Extract each tar layer once per (digest, prefix) into ``layers/``; return their directories.

    One budget for the whole model: its raw layers (their size, one entry each) and what its tar layers hold
    (a layer extracted before, maybe for another model, is charged what its directory holds) stay within
    ``max_bytes`` and ``max_files``, and its tar layers expand to at most ``expand_ratio`` times their
    compressed total plus one slack (:meth:`Budget.for_model`)."""
    result: dict[tuple[str, str], Path] = {}
    tar_steps = [s for s in steps if s.compression.is_tar]
    budget = Budget.for_model(max_files, max_bytes, sum(s.descriptor.size for s in tar_steps), expand_ratio)
    if tar_steps:
        progress.set("extracting")
    for step in steps:
        digest = step.descriptor.digest
        what = f"layer {digest}"
        if not step.compression.is_tar:
            budget.charge(what, entries=1, nbytes=step.descriptor.size)
            continue
        name = layer_name(step)
        target = store.layers / name
        result[(str(digest), step.prefix)] = target
        if not target.is_dir():
            with store.lock(f"layer-{name}"):
                if not target.is_dir():
                    _extract(store, step, target, budget, what)
                    continue
        _charge_extracted(target, budget, what)
    return result


def _extract(store: ContentStore, step: Step, target: Path, budget: Budget, what: str) -> None:
    """Extract the layer of ``step`` in a staging directory (charging ``budget``) and rename it to ``target``;
    nothing of a refused or failed extraction stays."""
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=store.layers))
    try:
        extract_tar(store.blob_path(step.descriptor.digest), step.compression, staging, budget=budget,
                    prefix=step.prefix, what=what)
        os.rename(staging, target)
        fsync_dir(store.layers)
    except BaseException:
        fdtree.remove_path(staging)
        raise


def _charge_extracted(layer: Path, budget: Budget, what: str) -> None:
    """Charge what an extracted layer holds: each entry, and the bytes of each file once per inode."""
    seen: set[int] = set()
    with fdtree.refusing(what):
        root = fdtree.open_path(layer)
        try:
            for _, _, entries in fdtree.walk(root):
                files = [st for _, st in entries if stat.S_ISREG(st.st_mode) and st.st_ino not in seen]
                seen.update(st.st_ino for st in files)
                budget.charge(what, entries=len(entries), nbytes=sum(st.st_size for st in files))
        finally:
            os.close(root)


def assemble_tree(store: ContentStore, key: str, plan: Plan, steps: list[Step],
                  layer_dirs: dict[tuple[str, str], Path], options: PullOptions) -> tuple[int, int]:
    """Build the tree of ``key`` from hardlinks in a staging directory and publish it with one rename;
    return (files, bytes)."""
    for stale in store.trees.glob(f".tmp-{key}-*"):
        fdtree.remove_path(stale)
    final = store.trees / key
    fdtree.remove_path(final)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=store.trees))
    try:
        with TreeBuilder(staging, options.path_filter) as builder:
            for step in steps:
                if step.compression.is_tar:
                    builder.overlay(layer_dirs[(str(step.descriptor.digest), step.prefix)], step.dest)
                else:
                    builder.add_file(step.dest, store.blob_path(step.descriptor.digest))
            if plan.layout == "image" and not any(staging.iterdir()):
                raise ModelCacheError(f"the image has nothing under /{plan.subpath}; set the path to the "
                                      f"directory that holds the model", kind=Kind.NOT_FOUND)
            if plan.layout != "image" and plan.subpath and not builder.is_dir(plan.subpath):
                raise ModelCacheError(f"path {plan.subpath!r} is not a directory in the model",
                                      kind=Kind.NOT_FOUND)
            stats = builder.finish()
        os.rename(staging, final)
        fsync_dir(store.trees)
    except BaseException:
        fdtree.remove_path(staging)
        raise
    return stats.files, stats.bytes
