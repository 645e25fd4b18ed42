"""Reference parsing with Docker's normalisation rules."""

from __future__ import annotations

import pytest

from modelcache.errors import InvalidReference
from modelcache.reference import parse_reference

HEX = "a" * 64


@pytest.mark.parametrize("text,registry,repository,tag,digest", [
    ("ubuntu", "docker.io", "library/ubuntu", None, None),
    ("user/model:v1", "docker.io", "user/model", "v1", None),
    ("registry.example.com/models/qwen2.5-0.5b:v1", "registry.example.com", "models/qwen2.5-0.5b", "v1", None),
    ("localhost/m", "localhost", "m", None, None),
    ("127.0.0.1:5000/a/b/c:tag", "127.0.0.1:5000", "a/b/c", "tag", None),
    (f"r.io/m@sha256:{HEX}", "r.io", "m", None, f"sha256:{HEX}"),
    (f"r.io:443/m:v2@sha256:{HEX}", "r.io:443", "m", "v2", f"sha256:{HEX}"),
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
