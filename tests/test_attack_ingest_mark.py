"""Attacks on the ingest mark (commit 4c2eb07): without a chunk index, lazy reads of a running ranged
download's partial file are recorded once, as ``live <mark>``, and trusted when the committed blob carries the
same mark. The argument is that every byte a reader serves is one the download's state file lists as written
to *that* file, and a listed byte is never written again. These tests break that argument: a state file that
lists the bytes of another file, a partial file removed under a running download, and records appended while a
settle is under way."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from modelcache.assemble.options import PullOptions
from modelcache.assemble.pull import download_blobs
from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.lazy.model import LazyModel
from modelcache.progress import Progress
from modelcache.push import push_directory
from modelcache.registry.manifest import Descriptor
from modelcache.registry.reference import parse_reference
from modelcache.registry.transport import RetryPolicy
from modelcache.store import rangedingest, servedranges
from modelcache.store.content import ContentStore
from modelcache.store.rangedingest import ingest_mark
from tests.conftest import make_client
from tests.helpers.proxy import GatedProxy

MIB = 1 << 20
PATIENT = RetryPolicy(attempts=3, base_delay=0.05, max_delay=0.2, connect_timeout=2, read_timeout=60)  # held streams
WEIGHTS = 24 * MIB + 4321  # past STATE_EVERY (8 MiB) twice: a lead stream lists its progress in the state file


def _model(tmp_path: Path) -> tuple[Path, bytes]:
    directory = tmp_path / "model"
    directory.mkdir()
    weights = os.urandom(WEIGHTS)
    (directory / "weights.safetensors").write_bytes(weights)
    (directory / "config.json").write_bytes(b'{"hidden": 8}')
    return directory, weights


def _wait(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("xattrs", [True, False], ids=["marked", "no-user-xattrs"])
def test_a_state_file_left_by_a_discarded_partial_does_not_vouch_for_the_new_one(  # type: ignore[no-untyped-def]
        registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xattrs: bool) -> None:
    """A hostile registry publishes two manifests naming the same weights blob: one declares a wrong size. A
    pod mounting that one starts a ranged download whose stream then falls short of the declared size: it
    fails, leaving its partial file (the wrong size) and its state file (listing the 16+ MiB it wrote) for a
    resume. A pod mounting the honest manifest then starts the same blob's download: RangedIngest.run finds
    the partial file the wrong size and replaces it with a new, empty (sparse) one with a new ingest mark,
    but leaves the old state file in place until the new lead stream first saves its own (after 8 MiB; the
    registry holds the stream before that). A lazy read then finds its bytes listed by the old state file,
    reads the new file's zeros, records only ``live <new mark>``, and serves them; the new file commits with
    that mark, so the floor never objects. Before the ingest mark these zeros were hashed and the commit
    turned them into a verdict, as it still does on a filesystem without user extended attributes (the
    ``no-user-xattrs`` case, which passes: it shows the hole is the mark's)."""
    if not xattrs:  # as on a filesystem without user xattrs: setting the mark fails, readers hash
        monkeypatch.setattr(rangedingest, "_set_mark", lambda fd: None)
    client = make_client()
    directory, weights = _model(tmp_path)
    ref = parse_reference(f"{registry.host}/attack/stale-state:v1")
    push_directory(client, directory, ref, chunk_index=False)
    store = ContentStore(tmp_path / "root")
    store.ensure()
    digest = Digest.of_bytes(weights)

    # 1. the other manifest: the same digest, declared 1 MiB longer; its ranged download fails part-way
    wrong = Descriptor("application/octet-stream", digest, WEIGHTS + MIB)
    with pytest.raises(Exception):  # noqa: B017,PT011 - how it fails does not matter, only what it leaves
        download_blobs(store, client, ref, [wrong], Progress(), 1, connections=4, ranged_min_size=MIB)
    partial, state = store.ranged_paths(digest)
    assert partial.stat().st_size == WEIGHTS + MIB  # left for a resume ...
    listed = store.live_ingest(digest)
    assert listed is not None and listed.on_disk(4 * MIB, 4 * MIB + 4096)  # ... with its written bytes listed

    # 2. the honest manifest, lazily mounted; the registry holds the lead stream of its download
    proxy = GatedProxy(registry.host)
    try:
        cache = ModelCache(store, make_client(retry=PATIENT), connections_per_blob=4, ranged_min_size=MIB)
        honest = parse_reference(f"{proxy.host}/attack/stale-state:v1")
        model = LazyModel(cache, cache.client.resolve(honest), PullOptions())
        model.build()
        node = model.lookup_path("weights.safetensors")
        assert node is not None and node.source is not None and node.source.digest == digest
        model.start_background()
        _wait(lambda: proxy.held >= 1, "the download's lead stream to be held")
        _wait(lambda: partial.exists() and partial.stat().st_size == WEIGHTS, "the new partial file")
        fd = os.open(partial, os.O_RDONLY)
        try:
            assert partial.stat().st_size == WEIGHTS and (ingest_mark(fd) is not None) == xattrs  # a new file
        finally:
            os.close(fd)

        served = model.read_node(node, 4 * MIB, 4096)  # what a pod reads through the FUSE mount now

        proxy.gate.set()
        _wait(model.complete.is_set, "the background pull")
        assert store.blob_path(digest).read_bytes() == weights
        verdict = store.served.verdict(digest)
        # the read served the blob's bytes, or what it served is caught: the model is broken
        assert served == weights[4 * MIB:4 * MIB + 4096] or (model.failure is not None and verdict is not None), (
            f"served {served[:16].hex()}... (the new partial file's unwritten bytes) instead of "
            f"{weights[4 * MIB:4 * MIB + 16].hex()}..., and no verdict (failure={model.failure}, verdict={verdict})")
        model.close()
    finally:
        proxy.gate.set()
        proxy.close()


def test_gc_leaves_a_running_ranged_download_and_what_was_read_of_it_alone(registry, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """ContentStore.clear_partials (collect_garbage, so eviction; and the single-flight pull that hit a full
    disk) spares an ingest whose per-digest lock is held, but it derives the lock's name from the file name
    by cutting at the first '-': for ``sha256-<hex>.ranged`` (and ``.ranged.json``) that is
    ``blob-sha256-<hex>.ranged.lock``, a lock nobody takes. So it deletes the partial file and state file of
    a ranged download under way. The download writes on into the unlinked file, then its commit (a rename
    of the path) fails; a retry starts a new file with a new ingest mark, and the ``live <mark>`` a lazy
    reader recorded for the deleted file no longer matches the committed blob: the model is declared
    broken (EIO for the pod) although every byte it served was right. (Had the first download failed
    instead of finishing, the state file it re-created would be left without its partial file: the stale
    state of the test above.)"""
    client = make_client()
    directory, weights = _model(tmp_path)
    ref = parse_reference(f"{registry.host}/attack/gc:v1")
    push_directory(client, directory, ref, chunk_index=False)
    store = ContentStore(tmp_path / "root")
    store.ensure()
    digest = Digest.of_bytes(weights)
    proxy = GatedProxy(registry.host, hold_from=12 * MIB)  # the download stops at 12 MiB until the gate opens
    try:
        cache = ModelCache(store, make_client(retry=PATIENT), connections_per_blob=4, ranged_min_size=MIB)
        model = LazyModel(cache, cache.client.resolve(parse_reference(f"{proxy.host}/attack/gc:v1")), PullOptions())
        model.build()
        node = model.lookup_path("weights.safetensors")
        assert node is not None and node.source is not None
        model.start_background()
        _wait(lambda: proxy.held >= 1, "the download to be held")
        view = store.live_ingest(digest)
        _wait(lambda: view is not None and view.on_disk(0, 4096), "the download's state file")
        assert model.read_node(node, 0, 4096) == weights[:4096]  # served from the download's partial file
        partial, _ = store.ranged_paths(digest)

        store.clear_partials()  # eviction's garbage collection, for another pull
        deleted = not partial.exists()

        proxy.gate.set()
        _wait(model.complete.is_set, "the background pull")
        first = model.failure
        if first is not None and model.retry_background() is not None:  # the plugin retries a failed pull
            _wait(model.complete.is_set, "the retried pull")
        assert store.blob_path(digest).read_bytes() == weights
        assert model.failure is None and store.served.verdict(digest) is None, (
            f"the running download's partial file was deleted by gc: {deleted}; the pull failed with {first!r}; "
            f"the model is now broken although it served the right bytes: {model.failure}")
        assert model.read_node(node, 0, 4096) == weights[:4096]
        model.close()
    finally:
        proxy.gate.set()
        proxy.close()


@pytest.mark.parametrize("kind", ["range", "live"])
def test_a_record_appended_while_a_settle_compares_is_not_lost(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                kind: str) -> None:
    """ServedRanges.settle reads the record file, compares it with the committed blob (hashing every recorded
    range of it, seconds for a large blob), then unlinks the file. A lazy server that records a read in
    between (its fetched range came late, or it read a partial file another download left) appends to the file
    the settle is about to unlink; it then sees the blob committed and settles itself, but when its append
    (write + fdatasync) finishes before the settle's unlink and its own settle reads after it, its line is
    gone: record() returns no verdict, the server serves the bytes, and nothing ever compares them. Here the
    other server's settle is held until the first one is done, as a slow fdatasync would hold it."""
    store = ContentStore(tmp_path / "root")
    store.ensure()
    blob = os.urandom(3 * MIB)
    digest = Digest.of_bytes(blob)
    store.served.record(digest, 0, blob[:MIB])  # served earlier, right

    served = store.served
    first_done, appended = threading.Event(), threading.Event()
    outcome: dict[str, str | None] = {}
    started: list[bool] = []
    original_settle = served.settle

    def other_server() -> None:  # a lazy server of another volume, recording a read of the same blob
        if kind == "range":  # a range the hostile registry answered wrongly
            outcome["verdict"] = served.record(digest, MIB, b"not the weights" * 1000)
        else:  # a partial file of a download that failed its digest (its mark is no committed blob's)
            outcome["verdict"] = served.record_live(digest, "0123456789abcdef0123456789abcdef")

    def settle(d: Digest) -> str | None:
        if threading.current_thread().name == "other-server":  # its line is on disk: now it settles
            appended.set()
            first_done.wait(10)
        return original_settle(d)

    real_parse = servedranges._parse

    def parse_then_compare(lines: list[str]) -> object:  # the first settle has read the records: it compares now
        if threading.current_thread() is threading.main_thread() and not started:
            started.append(True)
            threading.Thread(target=other_server, name="other-server").start()
            appended.wait(2)  # (a fix may well keep the other server from appending now)
        return real_parse(lines)

    monkeypatch.setattr(served, "settle", settle)
    monkeypatch.setattr(servedranges, "_parse", parse_then_compare)
    try:
        store.put_bytes(digest, blob)  # the download commits and settles
    finally:
        first_done.set()
    _wait(lambda: "verdict" in outcome, "the other server's record", 10)
    # the other server was told to serve (no verdict): then its wrong read must still come to a verdict
    assert outcome["verdict"] is not None or served.verdict(digest) is not None, (
        "a read recorded during a settle was served and its record lost: no verdict")
