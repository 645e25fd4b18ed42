"""Reference parsing with Docker's normalisation rules."""

from __future__ import annotations

import pytest

from modelcache.errors import InvalidReference, ModelCacheError
from modelcache.registry.hosts import HostsConfig
from modelcache.registry.reference import parse_reference

HEX = "a" * 64


@pytest.mark.parametrize("text,registry,repository,tag,digest", [
    ("ubuntu", "docker.io", "library/ubuntu", None, None),
    ("user/model:v1", "docker.io", "user/model", "v1", None),
    ("registry.example.com/models/qwen2.5-0.5b:v1", "registry.example.com", "models/qwen2.5-0.5b", "v1", None),
    ("localhost/m", "localhost", "m", None, None),
    ("127.0.0.1:5000/a/b/c:tag", "127.0.0.1:5000", "a/b/c", "tag", None),
    (f"r.io/m@sha256:{HEX}", "r.io", "m", None, f"sha256:{HEX}"),
    (f"r.io:443/m:v2@sha256:{HEX}", "r.io", "m", "v2", f"sha256:{HEX}"),
    ("index.docker.io/library/x", "docker.io", "library/x", None, None),
])
def test_parse(text: str, registry: str, repository: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag) == (registry, repository, tag)
    assert (str(ref.digest) if ref.digest else None) == digest


def test_selector_and_endpoint() -> None:
    assert parse_reference("m").selector == "latest"
    assert parse_reference("m").endpoint_host == "registry-1.docker.io"
    assert parse_reference(f"r.io/m:v@sha256:{HEX}").selector == f"sha256:{HEX}"


@pytest.mark.parametrize("bad", ["", " r.io/m", "r.io/M", "r.io/m:", "r.io/m@sha256:abc", "r.io/m@md5:" + HEX[:32],
                                 "r.io/../m", "r.io/m:" + "t" * 200, "bad host!/m"])
def test_invalid(bad: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(bad)


@pytest.mark.parametrize("text,registry,repository", [
    ("LOCALHOST:5055/prod/m", "localhost:5055", "prod/m"),
    ("LOCALHOST/prod/m", "localhost", "prod/m"),
    ("Registry.Example.COM/prod/m", "registry.example.com", "prod/m"),
    ("registry.example.com:443/prod/m", "registry.example.com", "prod/m"),
    ("registry.example.com:0443/prod/m", "registry.example.com", "prod/m"),
    ("registry.example.com:05000/prod/m", "registry.example.com:5000", "prod/m"),
    ("index.docker.io/library/x", "docker.io", "library/x"),
    ("registry-1.docker.io/library/x", "docker.io", "library/x"),
    ("Index.Docker.IO:443/x", "docker.io", "library/x"),
    ("registry-1.docker.io:0443/x", "docker.io", "library/x"),
    ("docker.io:5000/x", "docker.io:5000", "x"),  # another port: another registry
    ("[::1]:443/m", "[::1]", "m"),
    ("docker.io/x", "docker.io", "library/x"),
    ("[::1]:5000/m", "[::1]:5000", "m"),
    ("[0:0:0:0:0:0:0:1]:5000/m", "[::1]:5000", "m"),
    ("[FE80::A]/m", "[fe80::a]", "m"),
    ("[::ffff:127.0.0.1]:5000/m", "127.0.0.1:5000", "m"),
    ("127.1:5000/m", "127.0.0.1:5000", "m"),
    ("0x7f.0.0.1:5000/m", "127.0.0.1:5000", "m"),
    ("2130706433:5000/m", "127.0.0.1:5000", "m"),
    ("127.000.000.001:5000/m", "127.0.0.1:5000", "m"),
])
def test_registry_names_have_one_spelling(text: str, registry: str, repository: str) -> None:
    """Host names are case-insensitive, 443 is HTTPS's own port, Docker Hub has three names and an IP
    address many spellings: every consumer (policy rules, credentials, caches, allow-lists) sees one."""
    ref = parse_reference(text)
    assert (ref.registry, ref.repository) == (registry, repository)
    assert parse_reference(str(ref)) == ref


def test_docker_hub_is_reached_on_its_api_host() -> None:
    for text in ("x", "docker.io/x", "index.docker.io/x", "registry-1.docker.io/x"):
        assert parse_reference(text).endpoint_host == "registry-1.docker.io"


@pytest.mark.parametrize("bad", ["localhost.:5055/m", "r.io./m", "r.io:0/m", "r.io:65536/m", "r.io:99999/m",
                                 "[::1/m", "[zz::1]:5000/m", "[127.0.0.1]:5000/m", "256.0.0.1:5000/m"])
def test_unusual_host_spellings_are_refused(bad: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(bad)


def test_registry_settings_are_keyed_by_the_same_spelling() -> None:
    """A registries: entry written in another spelling still applies to the references it names."""
    hosts = HostsConfig.from_mapping({"registries": {"Registry.Example.COM:443": {"plainHTTP": True}}})
    ref = parse_reference("registry.example.com/ns/model:v1")
    assert [e.url for e in hosts.endpoints(ref.registry, ref.endpoint_host)] == ["http://registry.example.com"]
    with pytest.raises(ModelCacheError, match="under another spelling"):
        HostsConfig.from_mapping({"registries": {"r.io": {}, "R.IO:443": {}}})
    with pytest.raises(ModelCacheError, match="registries.bad host"):
        HostsConfig.from_mapping({"registries": {"bad host": {}}})
