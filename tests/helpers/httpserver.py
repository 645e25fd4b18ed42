"""Small HTTP/1.1 servers for the tests' fronts and fakes: a handler base that logs nothing, and a threaded
server (a thread per connection) started on a free port."""

from __future__ import annotations

import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 (connections kept alive unless an answer closes them), no access log."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True


def start_server(handler: type[BaseHTTPRequestHandler], address: str = "127.0.0.1", port: int = 0,
          tls: ssl.SSLContext | None = None) -> ThreadingHTTPServer:
    """Serve ``handler`` at ``address``:``port`` (0: a free one), over TLS with ``tls``, in a daemon thread;
    stop it with ``shutdown()`` and ``server_close()``."""
    server = _Server((address, port), handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
