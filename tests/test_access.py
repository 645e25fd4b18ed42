"""Who may read what (issue 22): access checks at the upstream, never a mirror; node-wide credentials lent
to volumes only for listed registries; credential helpers only from the node's own config; cache modes.
Real registries, the real plugin process over gRPC, real mounts."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from modelcache.store.content import ContentStore
from tests.conftest import PASSWORD, USER, needs_root
from tests.helpers.csi import CsiProcess, code_of, is_mounted, publish_request
from tests.helpers.oci import Fixtures
from tests.helpers.registry import RunningRegistry

OK, UNAUTHENTICATED = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
GOOD = {"username": USER, "password": PASSWORD}


@pytest.fixture
def plugins(tmp_path: Path) -> Iterator[list[CsiProcess]]:
    """Plugin processes started by a test; stopped, and their targets unmounted, afterwards."""
    started: list[CsiProcess] = []
    yield started
    for target in (tmp_path / "pods").glob("*/mnt") if (tmp_path / "pods").exists() else []:
        while is_mounted(target):
            subprocess.run(["umount", str(target)], check=False)
    for process in started:
        if process.process and process.process.poll() is None:
            process.stop()


def start_plugin(plugins: list[CsiProcess], workdir: Path, config: dict[str, object]) -> CsiProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    process = CsiProcess(workdir, "--config", str(path), root=workdir.parent / "root")
    plugins.append(process)
    return process


def target(tmp_path: Path, name: str) -> Path:
    (tmp_path / "pods" / name).mkdir(parents=True, exist_ok=True)
    return tmp_path / "pods" / name / "mnt"


def node_docker_config(path: Path, host: str, **extra: object) -> Path:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}, **extra}))
    return path


def records(root: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted((root / "models").glob("*.json"))]


# -- item 2: a mirror never decides access -----------------------------------------------------------------

@needs_root
def test_private_model_served_by_a_mirror_needs_upstream_access(tmp_path: Path, auth_fixtures: Fixtures,
                                                                 fixtures: Fixtures, plugins: list[CsiProcess]) -> None:
    """An open mirror (like Spegel, or a pull-through cache that already holds it) serves a private model
    to anyone: a volume still needs credentials the upstream accepts, and the model is recorded private."""
    files = {"w": b"private weights, mirrored"}
    auth_fixtures.raw_model("private/mirrored:v1", files)
    fixtures.raw_model("private/mirrored:v1", files)  # same bytes, same digest, on the open registry
    csi = start_plugin(plugins, tmp_path / "plugin", {
        "plainHTTP": True, "registries": {auth_fixtures.host: {"mirrors": [f"http://{fixtures.host}"]}}})
    ref = auth_fixtures.ref("private/mirrored:v1")
    assert code_of(csi.node.NodePublishVolume, publish_request("v0", target(tmp_path, "p0"), ref)) == UNAUTHENTICATED
    assert not target(tmp_path, "p0").exists()
    csi.node.NodePublishVolume(publish_request("v1", target(tmp_path, "p1"), ref, secrets=GOOD))
    assert (target(tmp_path, "p1") / "w").read_bytes() == files["w"]
    assert [r["auth_required"] for r in records(csi.root)] == [True]
    wrong = {"username": USER, "password": "wrong-password"}
    for i, secrets in enumerate(({}, wrong), start=2):  # cached now: still checked at the upstream
        request = publish_request(f"v{i}", target(tmp_path, f"p{i}"), ref, secrets=secrets)
        assert code_of(csi.node.NodePublishVolume, request) == UNAUTHENTICATED
    assert "wrong-password" not in csi.log_text() and PASSWORD not in csi.log_text()


@needs_root
def test_public_model_through_a_mirror_stays_public(tmp_path: Path, fixtures: Fixtures, registry: RunningRegistry,
                                                     proxy_factory, plugins: list[CsiProcess]) -> None:
    """The upstream answers an anonymous HEAD: the model is public and needs no credentials on a hit."""
    fixtures.raw_model("public/mirrored:v1", {"w": b"open weights"})
    mirror = proxy_factory()
    csi = start_plugin(plugins, tmp_path / "plugin", {
        "plainHTTP": True, "registries": {registry.host: {"mirrors": [f"http://{mirror.host}"]}}})
    ref = fixtures.ref("public/mirrored:v1")
    for i in range(2):
        csi.node.NodePublishVolume(publish_request(f"v{i}", target(tmp_path, f"p{i}"), ref))
    assert [r["auth_required"] for r in records(csi.root)] == [False]
    assert any("/blobs/" in path for _, path, _ in mirror.stats.requests)  # the mirror served it


# -- item 3: node-wide credentials are lent to volumes only for listed registries ---------------------------

@needs_root
def test_node_credentials_are_lent_only_to_listed_registries(tmp_path: Path, auth_fixtures: Fixtures,
                                                              plugins: list[CsiProcess]) -> None:
    digest = auth_fixtures.raw_model("private/node:v1", {"w": b"node-credential weights"})
    ref = auth_fixtures.ref("private/node:v1")
    docker_config = node_docker_config(tmp_path / "node-auth.json", auth_fixtures.host)
    unlisted = start_plugin(plugins, tmp_path / "unlisted", {
        "plainHTTP": True, "dockerConfig": str(docker_config), "nodeCredentialRegistries": ["registry.example.com"]})
    assert code_of(unlisted.node.NodePublishVolume, publish_request("v0", target(tmp_path, "p0"), ref)) == \
        UNAUTHENTICATED
    assert code_of(unlisted.node.NodePublishVolume,
                   publish_request("v1", target(tmp_path, "p1"), f"{ref}@{digest}", mount="lazy")) == UNAUTHENTICATED
    unlisted.stop()
    listed = start_plugin(plugins, tmp_path / "listed", {
        "plainHTTP": True, "dockerConfig": str(docker_config), "nodeCredentialRegistries": ["127.0.0.1:*"]})
    listed.node.NodePublishVolume(publish_request("v2", target(tmp_path, "p2"), ref))
    assert (target(tmp_path, "p2") / "w").read_bytes() == b"node-credential weights"
    listed.stop()


def test_the_cli_uses_node_credentials_for_every_registry(tmp_path: Path, auth_fixtures: Fixtures) -> None:
    auth_fixtures.raw_model("private/cli:v1", {"w": b"cli weights"})
    docker_config = node_docker_config(tmp_path / "node-auth.json", auth_fixtures.host)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"plainHTTP": True, "dockerConfig": str(docker_config),
                                  "nodeCredentialRegistries": ["registry.example.com"]}))
    done = subprocess.run([sys.executable, "-m", "ocimodel.cli", "pull", "--config", str(config),
                           "--root", str(tmp_path / "root"), auth_fixtures.ref("private/cli:v1")],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr


# -- item 4: credential helpers run only for the node's own config -------------------------------------------

@needs_root
def test_credential_helpers_in_a_volume_secret_never_run(tmp_path: Path, auth_fixtures: Fixtures,
                                                         plugins: list[CsiProcess],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    auth_fixtures.raw_model("private/helper:v1", {"w": b"helper weights"})
    ran = tmp_path / "helper-ran"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "docker-credential-pod"
    helper.write_text(f"#!/bin/sh\ntouch {ran}\necho '{{\"Username\": \"{USER}\", \"Secret\": \"{PASSWORD}\"}}'\n")
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    csi = start_plugin(plugins, tmp_path / "plugin", {"plainHTTP": True})
    ref = auth_fixtures.ref("private/helper:v1")
    for i, document in enumerate(({"auths": {}, "credHelpers": {auth_fixtures.host: "pod"}},
                                  {"auths": {}, "credsStore": "pod"})):
        secrets = {".dockerconfigjson": json.dumps(document)}
        request = publish_request(f"v{i}", target(tmp_path, f"p{i}"), ref, secrets=secrets)
        assert code_of(csi.node.NodePublishVolume, request) == UNAUTHENTICATED
        assert not ran.exists()
    log = csi.log_text()
    assert "credential helpers" in log and "ignored" in log
    csi.stop()
    node_config = node_docker_config(tmp_path / "node-auth.json", "unused.example.com",
                                     credHelpers={auth_fixtures.host: "pod"})
    node = start_plugin(plugins, tmp_path / "node-helper", {
        "plainHTTP": True, "dockerConfig": str(node_config), "nodeCredentialRegistries": ["127.0.0.1:*"]})
    node.node.NodePublishVolume(publish_request("v9", target(tmp_path, "p9"), ref))
    assert ran.exists()  # the node's own config may name helpers


# -- item 6: modes of the cache's directories ----------------------------------------------------------------

def test_cache_directories_have_their_documented_modes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for sub in ("blobs/sha256", "ingest", "locks", "layers", "trees", "models", "verdicts", "lazy", "quarantine",
                "csi/publications", "agent"):
        (root / sub).mkdir(parents=True)
        os.chmod(root / sub, 0o755)  # a store made by an older version
    os.chmod(root / "blobs", 0o755)
    os.chmod(root / "csi", 0o755)
    ContentStore(root).ensure()
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
             for p in [root, *root.iterdir(), root / "blobs" / "sha256"] if p.is_dir()}
    assert modes.pop(".") == 0o711
    for shared in ("blobs", "blobs/sha256", "layers", "trees"):
        assert modes.pop(shared) == 0o711, shared
    assert modes == {name: 0o700 for name in modes}, modes
    fresh = tmp_path / "fresh"
    ContentStore(fresh).ensure()
    assert stat.S_IMODE((fresh / "blobs" / "sha256").stat().st_mode) == 0o711
