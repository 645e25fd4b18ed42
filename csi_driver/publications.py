"""Published-volume records, kept on disk (atomic JSON) so a restarted driver knows what it mounted, the
credentials a lazy volume needs to resume (root-only files), and per-target locks that answer ABORTED while
another operation on the same target runs."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from csi_driver.errors import CsiError
from modelcache.assemble.options import PullOptions
from modelcache.fsutil import atomic_write_json, read_json

log = logging.getLogger(__name__)


@dataclass
class Publication:
    """One target path we mounted a model on."""

    volume_id: str
    target_path: str
    key: str
    source: str
    reference: str
    digest: str
    fingerprint: str
    access_mode: int
    readonly: bool
    mount: str
    ephemeral: bool
    files: int
    total_bytes: int
    pod: str = ""
    published_at: float = 0.0
    helper_pid: int = 0  # the local runner's server process
    pod_uid: str = ""
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    subpath: str = ""
    layers: list[str] = field(default_factory=list)
    strict: bool = False
    problem: str = ""
    mount_pod: str = ""  # the mount pod that runs the server (in a cluster)

    def options(self) -> PullOptions:
        """The pull options the volume was published with."""
        return PullOptions(tuple(self.include), tuple(self.exclude), self.subpath or None, tuple(self.layers))

    def pod_ref(self) -> tuple[str, str, str]:
        """``(namespace, name, uid)`` of the pod, as far as kubelet told us."""
        namespace, _, name = self.pod.partition("/")
        return (namespace, name, self.pod_uid) if name else ("", "", self.pod_uid)


class Publications:
    """Records under ``<root>/csi/publications``, lazy volumes' credentials under ``<root>/csi/credentials``
    (0700; files 0600), and in-process locks per target."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "csi" / "publications"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.secrets = root / "csi" / "credentials"
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.secrets, 0o700)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _path(self, target: str) -> Path:
        return self.dir / f"{hashlib.sha256(target.encode()).hexdigest()[:32]}.json"

    def _secret_path(self, target: str) -> Path:
        return self.secrets / f"{hashlib.sha256(target.encode()).hexdigest()[:32]}.json"

    def put_credentials(self, target: str, docker_config: dict[str, Any] | None) -> None:
        """Keep the Docker config a lazy volume's server needs to resume after a restart (root only: written
        0600 by an atomic replace, in a 0700 directory); none: forget it. Never logged."""
        if docker_config and docker_config.get("auths"):
            atomic_write_json(self._secret_path(target), {"target": target, "docker_config": docker_config})
        else:
            self._secret_path(target).unlink(missing_ok=True)

    def credentials(self, target: str) -> dict[str, Any] | None:
        """The Docker config kept for ``target`` by :meth:`put_credentials`, or None."""
        data = read_json(self._secret_path(target))
        if isinstance(data, dict) and data.get("target") == target and isinstance(data.get("docker_config"), dict):
            return data["docker_config"]  # type: ignore[no-any-return]
        return None

    def get(self, target: str) -> Publication | None:
        """The record for ``target``, if any."""
        data = read_json(self._path(target))
        if not isinstance(data, dict):
            return None
        try:
            publication = Publication(**data)
        except TypeError:
            log.warning("ignoring unreadable publication record for %s", target)
            return None
        return publication if publication.target_path == target else None

    def put(self, publication: Publication) -> None:
        """Persist ``publication`` atomically."""
        publication.published_at = publication.published_at or time.time()
        atomic_write_json(self._path(publication.target_path), asdict(publication))

    def delete(self, target: str) -> None:
        """Forget ``target`` and its credentials."""
        self._path(target).unlink(missing_ok=True)
        self._secret_path(target).unlink(missing_ok=True)

    def all(self) -> list[Publication]:
        """Every record."""
        result = []
        for path in sorted(self.dir.glob("*.json")):
            data = read_json(path)
            if isinstance(data, dict):
                with contextlib.suppress(TypeError):
                    result.append(Publication(**data))
        return result

    @contextlib.contextmanager
    def locked(self, target: str) -> Iterator[None]:
        """Hold the lock of ``target``; ABORTED if another operation holds it."""
        with self._guard:
            lock = self._locks.setdefault(target, threading.Lock())
        if not lock.acquire(blocking=False):
            raise CsiError(grpc.StatusCode.ABORTED, f"an operation on {target} is already in progress")
        try:
            yield
        finally:
            lock.release()
