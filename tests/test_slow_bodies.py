"""A floor on a registry's sending speed (modelcache.registry.slowbodies): a body that trickles is cut and
its read fails as unavailable, instead of holding a lazy read, a pull worker and a node-wide range
connection for as long as the registry likes. Real registry, throttled by a proxy in front."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading

import pytest

from modelcache.digest import Digest
from modelcache.errors import Kind, RegistryError
from modelcache.registry.manifest import Descriptor
from modelcache.registry.reference import parse_reference
from tests.conftest import FAST_RETRY, make_client
from tests.helpers.oci import Fixtures
from tests.helpers.proxy import ProxyBehaviour, RegistryProxy
from tests.helpers.waiting import wait_for

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


class Trickler:
    """A raw HTTP server that answers each request with ``head`` and ``body``, the bytes from ``drip_from``
    on one every DRIP seconds (400 of them take 20 s: far past every deadline the tests allow)."""

    DRIP = 0.05

    def __init__(self, head: bytes, body: bytes, drip_from: int) -> None:
        self.answer, self.drip_from = head + body, drip_from
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.cut = threading.Event()  # the client dropped the connection before the answer's end
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(65536)
            conn.sendall(self.answer[:self.drip_from])
            for i in range(self.drip_from, len(self.answer)):
                if self.stop.wait(self.DRIP):
                    return
                try:
                    conn.sendall(self.answer[i:i + 1])
                except OSError:
                    self.cut.set()
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("part", ["headers", "error body"])
def test_trickled_headers_or_error_body_are_cut(part: str) -> None:
    """An answer whose headers, or whose small (error) body, trickle is cut at the socket's read timeout
    plus its size limit at the floor speed: the connection is dropped before the answer's end, and the range
    read fails (as unavailable for headers; a cut error body only loses its detail), it is not held."""
    head = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n" + b"X-Pad: " + b"a" * 400 + b"\r\n"
    body = b"x" * 400
    head += f"Content-Length: {len(body)}\r\n\r\n".encode()
    server = Trickler(head, body, drip_from=20 if part == "headers" else len(head))
    try:
        client = make_client(retry=dataclasses.replace(FAST_RETRY, attempts=1, read_timeout=1.0))
        with pytest.raises(RegistryError) as info:
            client.download_range(parse_reference(f"{server.host}/slow/answer:v1"), Digest.parse("sha256:" + "a" * 64),
                                  10, 0, 10, lambda _, data: None)
        if part == "headers":
            assert info.value.kind is Kind.UNAVAILABLE and "slower than" in str(info.value)
        else:
            assert info.value.kind is Kind.NOT_FOUND
        wait_for(server.cut.is_set, "the client to drop the connection before the answer's end")
    finally:
        server.close()


@pytest.mark.parametrize("declared", ["\xb2", "9" * 5000])
def test_a_content_length_python_cannot_read_is_no_length(declared: str) -> None:
    """A Content-Length that looks like digits to str.isdigit() but not to int() (a superscript two, 5,000
    digits): the body is read as one of unknown length, not failed with a ValueError."""
    body = b"0123456789"
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n".encode("latin-1")
    server = Trickler(head, body, drip_from=len(head) + len(body))
    try:
        client = make_client(retry=dataclasses.replace(FAST_RETRY, attempts=1, read_timeout=1.0))
        received = bytearray()
        client.download_range(parse_reference(f"{server.host}/odd/length:v1"), Digest.parse("sha256:" + "a" * 64),
                              len(body), 0, len(body), lambda _, data: received.extend(data))
        assert bytes(received) == body
    finally:
        server.close()
