"""A floor on a registry's sending speed (modelcache.registry.slowbodies): a body that trickles is cut and
its read fails as unavailable, instead of holding a lazy read, a pull worker and a node-wide range
connection for as long as the registry likes. Real registry, throttled by a proxy in front."""

from __future__ import annotations

import dataclasses
import os

import pytest

from modelcache.digest import Digest
from modelcache.errors import Kind, RegistryError
from modelcache.registry.manifest import Descriptor
from modelcache.registry.reference import parse_reference
from tests.conftest import FAST_RETRY, make_client
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyBehaviour, RegistryProxy

DATA = os.urandom(100_000)


def fetch(fixtures: Fixtures, bytes_per_second: float, floor: float) -> tuple[bytes, Exception | None]:
    """Fetch a blob of DATA whole through a proxy sending ``bytes_per_second``, with a floor of ``floor``
    and one second of grace per read: what arrived, and the error."""
    digest = Digest.parse(fixtures.blob("slow/body", DATA)["digest"])
    proxy = RegistryProxy(fixtures.host, ProxyBehaviour(bytes_per_second=bytes_per_second))
    received = bytearray()
    try:
        client = make_client(retry=dataclasses.replace(FAST_RETRY, read_timeout=1.0, min_bytes_per_second=floor))
        ref = parse_reference(f"{proxy.host}/slow/body:v1")
        try:
            client.download_range(ref, digest, len(DATA), 0, len(DATA), lambda _, data: received.extend(data))
        except RegistryError as exc:
            return bytes(received), exc
        return bytes(received), None
    finally:
        proxy.close()


def test_a_body_slower_than_the_floor_is_cut(fixtures: Fixtures) -> None:
    """10 kB/s against a floor of 50 kB/s: the read is cut (UNAVAILABLE, said why) before the body ends."""
    received, error = fetch(fixtures, 10_000, 50_000)
    assert isinstance(error, RegistryError) and error.kind is Kind.UNAVAILABLE
    assert "slower than 50000 bytes per second" in str(error)
    assert len(received) < len(DATA)


def test_a_body_above_the_floor_is_read_whole(fixtures: Fixtures) -> None:
    """100 kB/s against a floor of 20 kB/s: a throttled body within the floor arrives whole."""
    received, error = fetch(fixtures, 100_000, 20_000)
    assert error is None and received == DATA


def test_a_trickling_stream_fails_a_pull_instead_of_holding_it(fixtures: Fixtures, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The whole-blob download of a pull gets the same floor."""
    digest = Digest.parse(fixtures.blob("slow/pull", DATA)["digest"])
    proxy = RegistryProxy(fixtures.host, ProxyBehaviour(bytes_per_second=5_000))
    try:
        client = make_client(retry=dataclasses.replace(FAST_RETRY, read_timeout=1.0, min_bytes_per_second=50_000))
        with open(tmp_path / "out", "wb") as out, pytest.raises(RegistryError, match="slower than") as info:
            from modelcache.digest import Verifier
            client.download_blob(parse_reference(f"{proxy.host}/slow/pull:v1"),
                                 Descriptor("application/octet-stream", digest, len(DATA)), out,
                                 Verifier(digest, len(DATA), "blob"))
        assert info.value.kind is Kind.UNAVAILABLE
        assert (tmp_path / "out").stat().st_size < len(DATA)
    finally:
        proxy.close()
