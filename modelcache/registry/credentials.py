"""Registry credentials: explicit username/password, Docker ``config.json`` files, per-volume secrets.

A :class:`Credentials` value never shows its secret in ``repr`` or ``str``.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcache.errors import Kind, ModelCacheError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Credentials:
    """A username and password, or an identity (refresh) token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    def __str__(self) -> str:
        return f"Credentials(username={self.username!r}, secret=***)"

    @property
    def empty(self) -> bool:
        """True when nothing would be sent."""
        return not (self.username or self.password or self.identity_token)


def _host_key(key: str) -> str:
    """A registry host as credentials are keyed: no scheme or path, lower case, no default ``:443``, and
    Docker Hub's names folded into ``docker.io``."""
    key = key.strip().lower()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    key = key.split("/", 1)[0].removesuffix(":443")
    return "docker.io" if key in ("index.docker.io", "registry-1.docker.io") else key


def host_matches(host: str, globs: tuple[str, ...]) -> bool:
    """True when ``host`` (normalised like a credentials key) matches one of ``globs``."""
    key = _host_key(host)
    return any(fnmatch.fnmatchcase(key, _host_key(pattern)) for pattern in globs)


_warned_helpers: set[str] = set()  # sources whose helper entries were ignored (warned once each)


def _decode_entry(host: str, entry: Mapping[str, Any]) -> Credentials:
    if not isinstance(entry, Mapping):
        raise ModelCacheError(f"docker config entry for {host} is not an object", kind=Kind.INVALID_ARGUMENT)
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ModelCacheError(f"docker config: 'auth' for {host} is not base64 of user:password",
                                  kind=Kind.INVALID_ARGUMENT) from None
        user, sep, password = decoded.partition(":")
        if not sep:
            raise ModelCacheError(f"docker config: 'auth' for {host} has no ':'", kind=Kind.INVALID_ARGUMENT)
        return Credentials(user, password, str(entry.get("identitytoken", "")))
    return Credentials(str(entry.get("username", "")), str(entry.get("password", "")),
                       str(entry.get("identitytoken", "")))


HELPER_TTL = 600.0  # seconds a credential helper's answer is reused (cloud tokens live 1-12 h)


@dataclass
class CredentialStore:
    """Credentials by registry host; later sources override earlier ones.

    A store made from a Docker config file reads it again when it changes (a rotated Secret); answers
    of credential helpers are reused for at most :data:`HELPER_TTL` seconds, and :meth:`forget` drops
    them at once (the transport calls it when a registry rejects what it was given). A merged store
    looks in its own entries first, then in the store it was merged onto."""

    by_host: dict[str, Credentials] = field(default_factory=dict, repr=False)
    helpers: dict[str, str] = field(default_factory=dict)
    default_helper: str = ""
    fallback: CredentialStore | None = field(default=None, repr=False)
    source_file: Path | None = None
    only: tuple[str, ...] | None = None  # a view that answers only for hosts matching these globs
    _stamp: tuple[int, int, int] | None = field(default=None, repr=False)
    _asked: dict[str, tuple[Credentials, float]] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __repr__(self) -> str:
        return f"CredentialStore(hosts={sorted(self.by_host)}, helpers={sorted(self.helpers)})"

    def lookup(self, host: str) -> Credentials | None:
        """Credentials for ``host`` (``docker.io`` aliases folded): a static entry, else what the host's
        Docker credential helper (``credHelpers`` / ``credsStore``) answers, else the fallback's, or None."""
        key = _host_key(host)
        if self.only is not None and not host_matches(key, self.only):
            return None
        self._reload_if_changed()
        with self._lock:
            found = self.by_host.get(key)
            helper = self.helpers.get(key) or self.default_helper
            asked = self._asked.get(key)
        if found is None and helper:
            if asked is not None and asked[1] > time.monotonic():
                return asked[0]
            found = _ask_helper(helper, key)
            if found is not None:
                with self._lock:
                    self._asked[key] = (found, time.monotonic() + HELPER_TTL)
        if found is None and self.fallback is not None:
            return self.fallback.lookup(host)
        return found

    def forget(self, host: str) -> None:
        """Drop what a credential helper answered for ``host`` (here and in the fallback): the next lookup
        asks it again."""
        with self._lock:
            self._asked.pop(_host_key(host), None)
        if self.fallback is not None:
            self.fallback.forget(host)

    def add(self, host: str, credentials: Credentials) -> None:
        """Set the credentials for ``host``."""
        with self._lock:
            self.by_host[_host_key(host)] = credentials

    def lent_for(self, globs: tuple[str, ...]) -> CredentialStore:
        """A view of this store that answers only for registries matching ``globs`` (node-wide credentials
        lent to volumes); it still follows this store's reloads."""
        return CredentialStore(fallback=self, only=globs)

    def merged(self, other: CredentialStore | None) -> CredentialStore:
        """A store with ``other``'s entries on top of this one's (this one still reloads its file)."""
        if other is None:
            return self
        return CredentialStore(dict(other.by_host), dict(other.helpers), other.default_helper, fallback=self)

    def to_docker_config(self) -> dict[str, Any]:
        """A Docker config document holding these credentials (to hand to a helper through a pipe)."""
        self._reload_if_changed()
        auths: dict[str, Any] = self.fallback.to_docker_config()["auths"] if self.fallback else {}
        with self._lock:
            entries = dict(self.by_host)
        if self.only is not None:
            auths = {host: entry for host, entry in auths.items() if host_matches(host, self.only)}
        for host, creds in entries.items():
            entry: dict[str, str] = {"auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()}
            if creds.identity_token:
                entry["identitytoken"] = creds.identity_token
            auths[host] = entry
        return {"auths": auths}

    def add_docker_config(self, data: Mapping[str, Any] | str | bytes, source: str = "docker config", *,
                          trusted: bool = False) -> None:
        """Add the ``auths`` of a Docker config (``config.json`` or ``.dockerconfigjson``). Its credential
        helpers (``credHelpers``, ``credsStore``: programs run on the node) count only when ``trusted`` (the
        node's own config file); anywhere else they are ignored, with one warning per source."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise ModelCacheError(f"{source} is not valid JSON: {exc}", kind=Kind.INVALID_ARGUMENT) from None
        if not isinstance(data, Mapping):
            raise ModelCacheError(f"{source} is not a JSON object", kind=Kind.INVALID_ARGUMENT)
        auths = data.get("auths", {})
        if not isinstance(auths, Mapping):
            raise ModelCacheError(f"{source}: 'auths' is not an object", kind=Kind.INVALID_ARGUMENT)
        for host, entry in auths.items():
            if entry:
                self.add(host, _decode_entry(host, entry))
        helpers = data.get("credHelpers", {})
        if not isinstance(helpers, Mapping):
            raise ModelCacheError(f"{source}: 'credHelpers' is not an object", kind=Kind.INVALID_ARGUMENT)
        if not trusted:
            if (helpers or data.get("credsStore")) and source not in _warned_helpers:
                _warned_helpers.add(source)
                log.warning("%s names credential helpers (credHelpers/credsStore); they are ignored: only the "
                            "node's own Docker config may run programs on the node", source)
            return
        with self._lock:
            for host, helper in helpers.items():
                self.helpers[_host_key(host)] = str(helper)
            if data.get("credsStore"):
                self.default_helper = str(data["credsStore"])

    @classmethod
    def from_docker_config_file(cls, path: str | os.PathLike[str]) -> CredentialStore:
        """Load a Docker ``config.json`` (a missing file gives an empty store), read again when it changes."""
        store = cls(source_file=Path(path))
        store._reload_if_changed()
        return store

    def _reload_if_changed(self) -> None:
        if self.source_file is None:
            return
        try:
            st = self.source_file.stat()  # follows the ..data symlink of a mounted Secret
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        fresh = CredentialStore()
        if stamp is not None:
            fresh.add_docker_config(self.source_file.read_bytes(), source=str(self.source_file), trusted=True)
        with self._lock:
            if self._stamp is not None:
                log.info("credentials file %s changed; using its new contents", self.source_file)
            self.by_host, self.helpers, self.default_helper = fresh.by_host, fresh.helpers, fresh.default_helper
            self._asked.clear()
            self._stamp = stamp


def _ask_helper(helper: str, host: str) -> Credentials | None:
    """Run ``docker-credential-<helper> get`` for ``host``; None when it has nothing (or is missing)."""
    program = shutil.which(f"docker-credential-{helper}")
    if program is None:
        log.warning("docker credential helper docker-credential-%s is not installed", helper)
        return None
    for server in (host, f"https://{host}"):
        try:
            proc = subprocess.run([program, "get"], input=server, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("docker credential helper %s failed: %s", helper, type(exc).__name__)
            return None
        if proc.returncode != 0:
            continue
        try:
            answer = json.loads(proc.stdout)
        except ValueError:
            log.warning("docker credential helper %s answered something that is not JSON", helper)
            return None
        username, secret = str(answer.get("Username", "")), str(answer.get("Secret", ""))
        if username == "<token>":
            return Credentials(identity_token=secret)
        return Credentials(username, secret)
    return None


def default_docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``."""
    base = os.environ.get("DOCKER_CONFIG")
    return Path(base) / "config.json" if base else Path.home() / ".docker" / "config.json"
