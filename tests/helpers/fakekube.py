"""An HTTP-level fake Kubernetes API server: answers scripted routes and records every request exactly
(method, path, query, content type, body), so tests check what the adapter sends on the wire."""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.helpers.httpserver import QuietHandler, start_server


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

        class Handler(QuietHandler):
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

        self.server = start_server(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

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


BASE = "/apis/ocimodel.csi.dev/v1alpha1"
NODE_LABELS = {"nodegroup": "gpu-a100", "kubernetes.io/hostname": "node-a"}


def modelcache(name: str, reference: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "ocimodel.csi.dev/v1alpha1", "kind": "ModelCache",
            "metadata": {"name": name, "namespace": "inference", "uid": f"uid-{name}", "resourceVersion": "10"},
            "spec": {"reference": reference, **spec}}


class Cluster:
    """A fake API server holding ModelCache objects in namespace ``inference`` and Node ``node-a`` (whose labels
    a test may change): list and watch (events a test puts), server-side apply of node-a's status entries,
    summary merge patches checked against resourceVersion, node label patches, events and secrets."""

    def __init__(self, objects: list[dict[str, Any]], secrets: dict[str, dict[str, str]]) -> None:
        self.api = FakeKubeAPI()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.stored = {o["metadata"]["name"]: json.loads(json.dumps(o)) for o in objects}
        self.conflicts: dict[str, int] = {}  # name -> how many summary patches another writer beats
        self.node_labels = dict(NODE_LABELS)
        api = self.api
        api.route("GET", "/api/v1/nodes/node-a", lambda r: (200, {"kind": "Node", "apiVersion": "v1", "metadata": {
            "name": "node-a", "labels": dict(self.node_labels)}}))
        api.route("PATCH", "/api/v1/nodes/node-a", (200, {"kind": "Node", "apiVersion": "v1",
                                                          "metadata": {"name": "node-a"}}))
        api.route("GET", f"{BASE}/modelcaches", self._list_or_watch)
        for obj in objects:
            name = obj["metadata"]["name"]
            api.route("PATCH", f"{BASE}/namespaces/inference/modelcaches/{name}/status",
                      lambda r, n=name: self._patch_status(n, r))
            api.route("GET", f"{BASE}/namespaces/inference/modelcaches/{name}",
                      lambda r, n=name: (200, self.stored[n]))
        api.route("POST", "/api/v1/namespaces/inference/events", lambda r: (201, r.body))
        for name, data in secrets.items():
            encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            api.route("GET", f"/api/v1/namespaces/inference/secrets/{name}",
                      (200, {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": name}, "data": encoded}))

    def _bump(self, name: str) -> None:
        meta = self.stored[name]["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)

    def modify(self, name: str, **spec: Any) -> None:
        """Change the spec of ``name`` (a key set to None is removed) and send the MODIFIED event."""
        with self.api.lock:
            stored = self.stored[name]
            for key, value in spec.items():
                if value is None:
                    stored["spec"].pop(key, None)
                else:
                    stored["spec"][key] = value
            self._bump(name)
            self.events.put({"type": "MODIFIED", "object": json.loads(json.dumps(stored))})

    def _patch_status(self, name: str, request: Recorded) -> tuple[int, Any]:
        """Server-side apply merges this node's entries; a merge patch is checked against resourceVersion."""
        obj = self.stored[name]
        status = obj.setdefault("status", {})
        if request.content_type == "application/apply-patch+yaml":
            mine = request.body["status"]["nodes"]
            others = [n for n in status.get("nodes", []) if n["node"] != "node-a"]
            status["nodes"] = others + mine
        else:
            if request.body["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
                return 409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
                             "code": 409}
            if self.conflicts.get(name):
                self.conflicts[name] -= 1
                status.setdefault("nodes", []).append({"node": "node-b", "phase": "Ready"})  # another agent
                self._bump(name)
                return 409, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict",
                             "code": 409}
            status.update(request.body["status"])
        self._bump(name)
        return 200, obj

    def _list_or_watch(self, request: Recorded) -> tuple[int, Any]:
        if request.query.get("watch") == ["true"]:
            lines = []
            try:
                lines.append(json.dumps(self.events.get(timeout=1.0)))
                while True:
                    lines.append(json.dumps(self.events.get_nowait()))
            except queue.Empty:
                pass
            return 200, ("\n".join(lines) + "\n").encode() if lines else b""
        return 200, {"kind": "ModelCacheList", "apiVersion": "ocimodel.csi.dev/v1alpha1",
                     "metadata": {"resourceVersion": "10"}, "items": json.loads(json.dumps(list(self.stored.values())))}

    def requests(self, method: str, path_part: str) -> list[Recorded]:
        with self.api.lock:
            return [r for r in self.api.requests if r.method == method and path_part in r.path]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = predicate()
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError("condition not met; requests: " + "\n".join(
            f"{r.method} {r.path} {r.body}" for r in self.api.requests[-30:]))

    def status_patches(self, name: str) -> list[dict[str, Any]]:
        """node-a's entries as applied, in order ({} for a removal)."""
        return [r.body["status"]["nodes"][0] if r.body["status"]["nodes"] else {}
                for r in self.requests("PATCH", f"/modelcaches/{name}/status")
                if r.content_type == "application/apply-patch+yaml"]

    def summary_patches(self, name: str) -> list[Recorded]:
        return [r for r in self.requests("PATCH", f"/modelcaches/{name}/status")
                if r.content_type == "application/merge-patch+json"]

    def event_bodies(self, name: str, reason: str) -> list[dict[str, Any]]:
        return [r.body for r in self.requests("POST", "/events")
                if r.body["involvedObject"]["name"] == name and r.body["reason"] == reason]
