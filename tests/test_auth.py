"""Registry auth against a real htpasswd registry and a Bearer-token front: success, failure, no secrets in logs."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelcache.cache import ModelCache
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.credentials import Credentials, CredentialStore
from modelcache.store.content import ContentStore
from tests.conftest import PASSWORD, USER, creds_for, make_client
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyBehaviour


def test_basic_auth_success(auth_fixtures: Fixtures, cache_root: Path) -> None:
    auth_fixtures.raw_model("private/model:v1", {"w": b"secret weights"})
    cache = ModelCache(ContentStore(cache_root), make_client(credentials=creds_for(auth_fixtures.host)))
    result = cache.pull(auth_fixtures.ref("private/model:v1"))
    assert (result.path / "w").read_bytes() == b"secret weights"
    assert result.record.auth_required


@pytest.mark.parametrize("credentials,kind", [(None, Kind.UNAUTHENTICATED),
                                              (("alice", "wrong"), Kind.UNAUTHENTICATED),
                                              (("mallory", PASSWORD), Kind.UNAUTHENTICATED)])
def test_basic_auth_failures(auth_fixtures: Fixtures, cache_root: Path, credentials, kind: Kind) -> None:
    auth_fixtures.raw_model("private/fail:v1", {"w": b"x"})
    store = creds_for(auth_fixtures.host, *credentials) if credentials else None
    cache = ModelCache(ContentStore(cache_root), make_client(credentials=store))
    with pytest.raises(ModelCacheError) as info:
        cache.pull(auth_fixtures.ref("private/fail:v1"))
    assert info.value.kind is kind
    assert PASSWORD not in str(info.value) and "wrong" not in str(info.value)
    assert list((cache_root / "trees").iterdir()) == []


def test_docker_config_file_credentials(auth_fixtures: Fixtures, cache_root: Path, tmp_path: Path) -> None:
    auth_fixtures.raw_model("private/dockercfg:v1", {"w": b"y"})
    config = tmp_path / "config.json"
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    config.write_text(json.dumps({"auths": {f"http://{auth_fixtures.host}": {"auth": token}}}))
    cache = ModelCache(ContentStore(cache_root),
                       make_client(credentials=CredentialStore.from_docker_config_file(config)))
    assert (cache.pull(auth_fixtures.ref("private/dockercfg:v1")).path / "w").read_bytes() == b"y"


def test_bearer_token_flow(registry, fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    fixtures.raw_model("token/model:v1", {"w": b"bearer"})
    proxy = proxy_factory(ProxyBehaviour(token_user=USER, token_password=PASSWORD))
    cache = ModelCache(ContentStore(cache_root), make_client(credentials=creds_for(proxy.host)))
    assert (cache.pull(f"{proxy.host}/token/model:v1").path / "w").read_bytes() == b"bearer"
    token_requests = [r for r in proxy.stats.requests if r[1].startswith("/token")]
    assert token_requests, "the client never asked the token service"
    assert "scope=repository%3Atoken%2Fmodel%3Apull" in token_requests[0][1]
    authorised = [r for r in proxy.stats.requests if r[2].get("authorization", "").startswith("Bearer ")]
    assert authorised


def test_bearer_token_wrong_password(fixtures: Fixtures, proxy_factory, cache_root: Path) -> None:
    fixtures.raw_model("token/denied:v1", {"w": b"x"})
    proxy = proxy_factory(ProxyBehaviour(token_user=USER, token_password=PASSWORD))
    cache = ModelCache(ContentStore(cache_root), make_client(credentials=creds_for(proxy.host, USER, "nope")))
    with pytest.raises(ModelCacheError) as info:
        cache.pull(f"{proxy.host}/token/denied:v1")
    assert info.value.kind is Kind.UNAUTHENTICATED


def test_credentials_never_in_repr() -> None:
    creds = Credentials("bob", "hunter2-password")
    store = CredentialStore({"r.example": creds})
    assert "hunter2" not in repr(creds) and "hunter2" not in str(creds) and "hunter2" not in repr(store)


def test_secrets_absent_from_cli_logs_and_errors(auth_fixtures: Fixtures, tmp_path: Path) -> None:
    auth_fixtures.raw_model("private/logs:v1", {"w": b"z"})
    env = {"OCIMODEL_PASSWORD": "not-the-password-xyz", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "ocimodel.cli", "-vv", "pull", auth_fixtures.ref("private/logs:v1"),
                           "--plain-http", "--root", str(tmp_path / "c"), "--username", USER],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert "not-the-password-xyz" not in proc.stderr + proc.stdout
    assert "rejected" in proc.stderr
    ok = subprocess.run([sys.executable, "-m", "ocimodel.cli", "-vv", "pull", auth_fixtures.ref("private/logs:v1"),
                         "--plain-http", "--root", str(tmp_path / "c"), "--username", USER, "--password-stdin"],
                        input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert PASSWORD not in ok.stderr + ok.stdout and encoded not in ok.stderr + ok.stdout
    assert "DEBUG" in ok.stderr  # verbose logging was on, and still showed no secret


def test_library_logging_has_no_secret(auth_fixtures: Fixtures, cache_root: Path, caplog) -> None:
    auth_fixtures.raw_model("private/caplog:v1", {"w": b"q"})
    caplog.set_level(logging.DEBUG)
    cache = ModelCache(ContentStore(cache_root), make_client(credentials=creds_for(auth_fixtures.host)))
    cache.pull(auth_fixtures.ref("private/caplog:v1"))
    encoded = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert caplog.records
    assert PASSWORD not in caplog.text and encoded not in caplog.text


def test_docker_credential_helper(auth_fixtures: Fixtures, cache_root: Path, tmp_path: Path) -> None:
    auth_fixtures.raw_model("private/helper:v1", {"w": b"via helper"})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    asked = tmp_path / "asked"
    helper = bin_dir / "docker-credential-ocitest"
    answer = json.dumps({"Username": USER, "Secret": PASSWORD})
    helper.write_text(f"#!/bin/sh\nread server; echo \"$1 $server\" >> {asked}\necho '{answer}'\n")
    helper.chmod(0o755)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"auths": {}, "credHelpers": {auth_fixtures.host: "ocitest"}}))
    env_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{env_path}"
    try:
        store = CredentialStore.from_docker_config_file(config)
        cache = ModelCache(ContentStore(cache_root), make_client(credentials=store))
        assert (cache.pull(auth_fixtures.ref("private/helper:v1")).path / "w").read_bytes() == b"via helper"
    finally:
        os.environ["PATH"] = env_path
    assert asked.read_text().strip() == f"get {auth_fixtures.host}"
    assert PASSWORD not in repr(store)


def test_rotated_credentials_are_picked_up_without_a_restart(fixtures: Fixtures, proxy_factory, cache_root: Path,
                                                             tmp_path: Path) -> None:
    """One long-lived cache, as in the plugin and the agent: tokens expire and passwords rotate, both in
    a credential helper's answer and in a (Secret-mounted) config file; the next pull uses the new ones."""
    fixtures.raw_model("rotate/a:v1", {"w": b"a"})
    fixtures.raw_model("rotate/b:v1", {"w": b"b"})
    fixtures.raw_model("rotate/c:v1", {"w": b"c"})
    proxy = proxy_factory(ProxyBehaviour(token_user=USER, token_password="first-Pa55"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    answer, asked = tmp_path / "answer.json", tmp_path / "asked"
    helper = bin_dir / "docker-credential-rotating"
    helper.write_text(f"#!/bin/sh\nread server; echo asked >> {asked}\ncat {answer}\n")
    helper.chmod(0o755)
    answer.write_text(json.dumps({"Username": USER, "Secret": "first-Pa55"}))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {proxy.host: "rotating"}}))
    env_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bin_dir}:{env_path}"
    try:
        cache = ModelCache(ContentStore(cache_root), make_client(credentials=CredentialStore.from_docker_config_file(
            config)))
        assert (cache.pull(f"{proxy.host}/rotate/a:v1").path / "w").read_bytes() == b"a"
        # the registry rotates the password and every issued token expires; the helper learns the new one
        proxy.behaviour.token_password = "second-Pa55"
        proxy.tokens.clear()
        answer.write_text(json.dumps({"Username": USER, "Secret": "second-Pa55"}))
        assert (cache.pull(f"{proxy.host}/rotate/b:v1").path / "w").read_bytes() == b"b"
        assert len(asked.read_text().split()) == 2  # asked again once the old answer was refused
        # the node's config file (a mounted Secret) is replaced by one with static credentials
        proxy.behaviour.token_password = "third-Pa55"
        proxy.tokens.clear()
        replacement = tmp_path / "config.json.new"
        replacement.write_text(json.dumps({"auths": {proxy.host: {"auth": base64.b64encode(
            f"{USER}:third-Pa55".encode()).decode()}}}))
        os.replace(replacement, config)
        assert (cache.pull(f"{proxy.host}/rotate/c:v1").path / "w").read_bytes() == b"c"
        assert len(asked.read_text().split()) == 2  # static credentials now: the helper is not asked
    finally:
        os.environ["PATH"] = env_path
