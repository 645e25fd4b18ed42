"""A real HTTP proxy on loopback in front of a registry: counts requests, throttles, breaks, stalls,
corrupts, fails with 5xx, or demands Bearer tokens. Every behaviour is switched per test. A gated proxy
holds blob downloads until the test opens its gate: a test that needs a download unfinished holds it so,
rather than racing a throttle."""

from __future__ import annotations

import base64
import http.client
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from tests.helpers.httpserver import QuietHandler, start_server

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
               "proxy-authenticate", "host"}


@dataclass
class ProxyBehaviour:
    bytes_per_second: float = 0.0          # throttle blob bodies (0 = unlimited)
    cut_after_bytes: int = 0               # close a blob body after this many bytes, once per request (0 = never)
    cut_times: int = 0                     # how many responses to cut
    stall_after_bytes: int = -1            # stop sending (without closing) after this many bytes
    corrupt_blobs: bool = False            # flip a byte in every blob body
    fail_status: int = 0                   # answer this status ...
    fail_times: int = 0                    # ... this many times
    not_found: bool = False                # answer 404 to everything (a mirror without the content)
    token_user: str = ""                   # require Bearer tokens issued to this user
    token_password: str = ""
    ignore_range: bool = False             # serve 200 with the whole body even for Range requests
    corrupt_ranges: bool = False           # flip a byte in every 206 body (whole-blob GETs stay right)
    shift_ranges: int = 0                  # answer a Range request with the range this many bytes later
    blob_delay: float = 0.0                # wait this long before answering each blob GET
    keep_alive: bool = False               # keep connections open between answers (default: close each)


@dataclass
class ProxyStats:
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    blob_gets: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    blob_gets_now: int = 0                 # blob GETs being answered
    blob_gets_peak: int = 0                # the most answered at once
    connections: int = 0                   # TCP connections accepted


class RegistryProxy:
    def __init__(self, upstream: str, behaviour: ProxyBehaviour | None = None, port: int = 0) -> None:
        self.upstream = upstream
        self.behaviour = behaviour or ProxyBehaviour()
        self.stats = ProxyStats()
        self.tokens: set[str] = set()
        proxy = self

        class Handler(QuietHandler):
            def setup(self) -> None:
                super().setup()
                with proxy.stats.lock:
                    proxy.stats.connections += 1

            def do_GET(self) -> None:
                proxy._handle(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        self.server = start_server(Handler, port=port)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- handling -----------------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        path = h.path
        blob_get = h.command == "GET" and "/blobs/sha256:" in path
        with self.stats.lock:
            self.stats.requests.append((h.command, path, {k.lower(): v for k, v in h.headers.items()}))
            if blob_get:
                self.stats.blob_gets[urlsplit(path).path.rsplit("/", 1)[-1]] += 1
                self.stats.blob_gets_now += 1
                self.stats.blob_gets_peak = max(self.stats.blob_gets_peak, self.stats.blob_gets_now)
        try:
            if blob_get and b.blob_delay:
                time.sleep(b.blob_delay)
            self._answer(h)
        finally:
            if blob_get:
                with self.stats.lock:
                    self.stats.blob_gets_now -= 1

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        path = h.path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        if urlsplit(path).path == "/token":
            return self._token(h)
        if b.token_user and not self._authorised(h):
            return self._reply(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}',
                               {"WWW-Authenticate": f'Bearer realm="http://{self.host}/token",service="test-registry"'})
        if b.not_found:
            return self._reply(h, 404, b'{"errors":[{"code":"NAME_UNKNOWN","message":"not here"}]}')
        with self.stats.lock:
            failing = b.fail_times > 0
            if failing:
                b.fail_times -= 1
        if failing:
            return self._reply(h, b.fail_status, b"")
        headers = {k: v for k, v in h.headers.items() if k.lower() not in HOP_HEADERS and k.lower() != "authorization"}
        if b.ignore_range:
            headers.pop("Range", None)
        if b.shift_ranges and "Range" in headers:
            first, _, last = headers["Range"].removeprefix("bytes=").partition("-")
            headers["Range"] = f"bytes={int(first) + b.shift_ranges}-{int(last) + b.shift_ranges}"
        connection = http.client.HTTPConnection(self.upstream, timeout=60)
        connection.request(h.command, path, body=body, headers=headers)
        response = connection.getresponse()
        is_blob = h.command == "GET" and "/blobs/sha256:" in path and response.status in (200, 206)
        corrupt = is_blob and (b.corrupt_blobs or (b.corrupt_ranges and response.status == 206))
        h.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() in HOP_HEADERS:
                continue
            if key.lower() == "location" and self.upstream in value:
                value = value.replace(self.upstream, self.host)
            h.send_header(key, value)
        if not b.keep_alive:
            h.send_header("Connection", "close")
        h.end_headers()
        if h.command == "HEAD":
            connection.close()
            return
        whole = self._stream(h, response, is_blob, corrupt)
        connection.close()
        h.close_connection = not (b.keep_alive and whole)

    def _stream(self, h: BaseHTTPRequestHandler, response: http.client.HTTPResponse, is_blob: bool,
                corrupt: bool) -> bool:
        """Send the body; False when it was cut short."""
        b = self.behaviour
        sent = 0
        started = time.monotonic()
        corrupted = False
        while True:
            chunk = response.read(65536)
            if not chunk:
                break
            if is_blob and b.stall_after_bytes >= 0 and sent + len(chunk) > b.stall_after_bytes:
                h.wfile.write(chunk[: max(0, b.stall_after_bytes - sent)])
                h.wfile.flush()
                time.sleep(3600)
            if is_blob and b.cut_after_bytes and sent + len(chunk) > b.cut_after_bytes and self._take_cut():
                h.wfile.write(chunk[: b.cut_after_bytes - sent])
                h.wfile.flush()
                return False
            if corrupt and not corrupted:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                corrupted = True
            # throttled, a chunk goes out in pieces of a twentieth of a second each: a steady stream, not bursts
            step = max(1024, int(b.bytes_per_second / 20)) if is_blob and b.bytes_per_second else len(chunk)
            for offset in range(0, len(chunk), step):
                piece = chunk[offset:offset + step]
                try:
                    h.wfile.write(piece)
                    h.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return False
                sent += len(piece)
                if is_blob and b.bytes_per_second:
                    ahead = sent / b.bytes_per_second - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        return True

    def _take_cut(self) -> bool:
        with self.stats.lock:
            if self.behaviour.cut_times > 0:
                self.behaviour.cut_times -= 1
                return True
            return False

    def _reply(self, h: BaseHTTPRequestHandler, status: int, body: bytes,
               headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def _authorised(self, h: BaseHTTPRequestHandler) -> bool:
        value = h.headers.get("Authorization", "")
        return value.startswith("Bearer ") and value[7:] in self.tokens

    def _token(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        query = parse_qs(urlsplit(h.path).query)
        value = h.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(f"{b.token_user}:{b.token_password}".encode()).decode()
        if value != expected or query.get("service") != ["test-registry"] or not query.get("scope"):
            return self._reply(h, 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}')
        token = secrets.token_hex(16)
        self.tokens.add(token)
        self._reply(h, 200, f'{{"token": "{token}", "expires_in": 300}}'.encode())


class _HeldBody:
    """A response body that hands over its first ``before`` bytes, then waits (``hold``) before the rest."""

    def __init__(self, response: http.client.HTTPResponse, before: int, hold: Callable[[], None]) -> None:
        self.response, self.left, self.hold = response, before, hold

    def read(self, size: int) -> bytes:
        if self.left is not None and self.left <= 0:
            self.hold()
            self.left = None
        if self.left is None:
            return self.response.read(size)
        chunk = self.response.read(min(size, self.left))
        self.left -= len(chunk)
        return chunk


class GatedProxy(RegistryProxy):
    """A proxy whose blob downloads wait until :attr:`gate` opens, so that a download stays unfinished for
    exactly as long as a test needs, however fast or busy the machine. By default a whole-blob GET (no Range,
    or a resume ``bytes=N-``) of a blob of at least ``min_size`` bytes sends its headers and then nothing until
    the gate opens, while a lazy read's closed ranges (and a small file's whole blob) pass at once: hold a
    download so with ``connectionsPerBlob: 1`` or a blob under ``rangedMinSizeMiB``, as a ranged download's
    pieces are closed ranges too. With ``hold_from``, every blob GET (pieces and reads alike) sends the bytes
    before that offset of the blob and holds the rest. :attr:`held` counts the responses waiting now."""

    def __init__(self, upstream: str, behaviour: ProxyBehaviour | None = None, port: int = 0, *,
                 hold_from: int | None = None, min_size: int = 1 << 20) -> None:
        super().__init__(upstream, behaviour, port)
        self.gate = threading.Event()
        self.hold_from, self.min_size = hold_from, min_size
        self.held = 0
        self._asked = threading.local()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        first, _, last = h.headers.get("Range", "").removeprefix("bytes=").partition("-")
        self._asked.span = (int(first) if first.isdigit() else 0, int(last) if last.isdigit() else None)
        super()._handle(h)

    def _stream(self, h: BaseHTTPRequestHandler, response: http.client.HTTPResponse, is_blob: bool,
                corrupt: bool) -> bool:
        start, last = self._asked.span
        before: int | None = None
        if not is_blob:
            pass
        elif self.hold_from is None:
            if last is None and start + int(response.getheader("Content-Length") or 0) >= self.min_size:
                before = 0
        elif last is None or last >= self.hold_from:
            before = max(0, self.hold_from - start)
        if before is not None:
            response = _HeldBody(response, before, self._hold)  # type: ignore[assignment]
        return super()._stream(h, response, is_blob, corrupt)

    def _hold(self) -> None:
        with self.stats.lock:
            self.held += 1
        try:
            self.gate.wait()
        finally:
            with self.stats.lock:
                self.held -= 1


class ProxyProcess:
    """The proxy in its own process: needed when the test process itself faults in pages of a FUSE
    mount (an mmap read holds the GIL while the kernel waits for the FUSE daemon, which would wait for
    an in-process proxy)."""

    def __init__(self, upstream: str, *, bytes_per_second: float = 0, corrupt: bool = False, port: int = 0,
                 log: str = "", corrupt_ranges: bool = False, shift_ranges: int = 0, gate: bool = False,
                 hold_from: int | None = None) -> None:
        """With ``gate`` (or ``hold_from``) a :class:`GatedProxy`: blob downloads wait for :meth:`open_gate`."""
        import subprocess
        import sys
        args = [sys.executable, "-m", "tests.helpers.proxy", upstream, "--bytes-per-second", str(bytes_per_second),
                "--port", str(port)]
        if gate or hold_from is not None:
            args.append("--gate")
        if hold_from is not None:
            args += ["--hold-from", str(hold_from)]
        if corrupt:
            args.append("--corrupt")
        if corrupt_ranges:
            args.append("--corrupt-ranges")
        if shift_ranges:
            args += ["--shift-ranges", str(shift_ranges)]
        if log:
            args += ["--log", log]
        from pathlib import Path
        self.process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=Path(__file__).resolve().parents[2])  # so -m finds tests.helpers
        assert self.process.stdout is not None
        self.host = self.process.stdout.readline().strip()
        self.log = log

    def open_gate(self) -> None:
        """Let the held downloads (and every later one) through."""
        assert self.process.stdin is not None
        self.process.stdin.write("open\n")
        self.process.stdin.flush()

    def requests(self) -> list[dict[str, str]]:
        import json
        with open(self.log) as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        if self.process.stdin is not None:
            self.process.stdin.close()


def _main() -> None:
    import argparse
    import json
    import sys
    parser = argparse.ArgumentParser()
    parser.add_argument("upstream")
    parser.add_argument("--bytes-per-second", type=float, default=0)
    parser.add_argument("--corrupt", action="store_true")
    parser.add_argument("--corrupt-ranges", action="store_true")
    parser.add_argument("--shift-ranges", type=int, default=0)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", default="")
    parser.add_argument("--gate", action="store_true", help="hold blob downloads until 'open' is read on stdin")
    parser.add_argument("--hold-from", type=int, default=None)
    args = parser.parse_args()
    behaviour = ProxyBehaviour(bytes_per_second=args.bytes_per_second, corrupt_blobs=args.corrupt,
                               corrupt_ranges=args.corrupt_ranges, shift_ranges=args.shift_ranges)
    proxy = (GatedProxy(args.upstream, behaviour, args.port, hold_from=args.hold_from) if args.gate
             else RegistryProxy(args.upstream, behaviour, port=args.port))
    if args.log:
        original = proxy._handle

        def logged(h: BaseHTTPRequestHandler) -> None:
            with open(args.log, "a") as out:
                out.write(json.dumps({"method": h.command, "path": h.path, "range": h.headers.get("Range", "")}) + "\n")
            original(h)
        proxy._handle = logged  # type: ignore[method-assign]
    print(proxy.host, flush=True)
    if isinstance(proxy, GatedProxy):
        for line in sys.stdin:
            if line.strip() == "open":
                proxy.gate.set()
    threading.Event().wait()


if __name__ == "__main__":
    _main()
