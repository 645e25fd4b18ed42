"""Re-verifying the cache at rest: every committed blob hashed again (bit rot, tampering), the models that
use a bad one reported, and with ``repair`` taken out of use so that the next pull fetches it again."""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from modelcache.cache import ModelCache
from modelcache.digest import Digest
from modelcache.progress import Progress
from modelcache.store.content import blob_lease
from modelcache.upkeep.gc import ModelInUse, remove_model

log = logging.getLogger(__name__)


@dataclass
class BadBlob:
    """A committed blob whose content no longer matches its digest."""

    digest: str
    models: list[str]
    removed_models: list[str] = field(default_factory=list)
    kept_models: list[str] = field(default_factory=list)  # mounted or in use: restart their pods
    quarantined: str = ""


@dataclass
class VerifyReport:
    """What a verification pass found (and, with repair, did)."""

    blobs: int = 0
    bytes: int = 0
    bad: list[BadBlob] = field(default_factory=list)


def _rehash(digest: Digest, path: Path, progress: Progress) -> bool:
    """True when the file at ``path`` still hashes to ``digest``."""
    hasher = hashlib.new(digest.algorithm)
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            hasher.update(view[:n])
            progress.advance(n)  # shown as the hashing rate
    return hasher.hexdigest() == digest.hex


def verify_cache(cache: ModelCache, *, repair: bool = False, workers: int = 4,
                 progress: Progress | None = None) -> VerifyReport:
    """Hash every committed blob again, ``workers`` at a time. A bad blob is reported with the models that
    use it; with ``repair``, those models are removed (mounted ones are kept and reported) and, once no
    model uses it, the blob is moved to ``quarantine/`` so the next pull fetches it again."""
    progress = progress or Progress()
    blobs = list(cache.store.iter_blobs())
    report = VerifyReport(len(blobs), sum(path.stat().st_size for _, path in blobs))
    progress.set("verifying", total=report.bytes, done=0)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        verdicts = list(pool.map(lambda item: _rehash(item[0], item[1], progress), blobs))
    users: dict[str, list[str]] = {}
    for record in cache.records():
        for used in record.blobs:
            users.setdefault(used, []).append(record.key)
    for (digest, path), ok in zip(blobs, verdicts, strict=True):
        if ok:
            continue
        bad = BadBlob(str(digest), sorted(users.get(str(digest), [])))
        log.error("blob %s no longer matches its digest (used by %s)", digest, ", ".join(bad.models) or "no model")
        if repair:
            _repair(cache, digest, path, bad)
        report.bad.append(bad)
    progress.set("verified")
    return report


def _repair(cache: ModelCache, digest: Digest, path: Path, bad: BadBlob) -> None:
    for key in bad.models:
        try:
            remove_model(cache, key)
            bad.removed_models.append(key)
        except ModelInUse as exc:
            log.warning("blob %s is bad but model %s is in use (%s); restart its pods, then verify again", digest,
                        key, exc)
            bad.kept_models.append(key)
    if bad.kept_models:
        return
    with cache.store.claim(blob_lease(digest)) as claimed:
        if not claimed:
            bad.kept_models.append("(a pull in progress)")
            return
        quarantine = cache.store.root / "quarantine"
        quarantine.mkdir(exist_ok=True)
        destination = quarantine / f"{digest.algorithm}-{digest.hex}"
        os.replace(path, destination)
        bad.quarantined = str(destination)
        log.warning("blob %s moved to %s; the next pull fetches it again", digest, destination)
