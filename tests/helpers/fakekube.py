"""An HTTP-level fake Kubernetes API server: answers scripted routes and records every request exactly
(method, path, query, content type, body), so tests check what the adapter sends on the wire."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


Responder = Callable[[Recorded], tuple[int, Any]]


class FakeKubeAPI:
    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Responder] = {}
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

            def handle_any(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                record = Recorded(self.command, parts.path, parse_qs(parts.query),
                                  self.headers.get("Content-Type", ""), body,
                                  {k.lower(): v for k, v in self.headers.items()})
                with api.lock:
                    api.requests.append(record)
                    responder = api.routes.get((self.command, parts.path))
                status, payload = responder(record) if responder else (404, {
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def route(self, method: str, path: str, responder: Responder | tuple[int, Any]) -> None:
        self.routes[(method, path)] = responder if callable(responder) else (lambda _r, v=responder: v)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_kubeconfig(path: Path, url: str) -> Path:
    """A kubeconfig file that points at ``url`` without credentials."""
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "c",
                                "clusters": [{"name": "c", "cluster": {"server": url}}],
                                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                                "users": [{"name": "u", "user": {}}]}))
    return path
