"""What the agent reads from and tells Kubernetes: its entry of ``status.nodes`` and the summary, Events on
ModelCache objects, its Node's labels, and pull secrets. Every call runs in a worker thread."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from typing import Any

import trio

from kubeadapter.client import KubeClient
from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.credentials import CredentialStore
from node_agent import GROUP, KIND, PLURAL, VERSION
from node_agent.spec import ModelCacheSpec

log = logging.getLogger(__name__)
COMPONENT = "ocimodel-agent"


def timestamp(seconds: float | None = None) -> str:
    """An RFC 3339 UTC time (now, or Unix time ``seconds``)."""
    moment = datetime.datetime.now(datetime.UTC) if seconds is None else \
        datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def summarize_nodes(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    """``status.summary`` of a ModelCache: how many nodes reported, are ready, failed; the revision a node switched
    to last (12 hex digits of its digest) and how many nodes have it (the Revision and Current columns)."""
    phases = [str(n.get("phase", "")) for n in nodes]
    ready = [n for n in nodes if n.get("phase") == "Ready" and n.get("digest")]
    latest = max(ready, key=lambda n: str(n.get("switchedAt") or ""), default=None)
    digest = str(latest["digest"]) if latest else ""
    return {"nodes": len(nodes), "ready": phases.count("Ready"), "failed": phases.count("Failed"),
            "revision": digest.partition(":")[2][:12], "current": sum(1 for n in ready if n["digest"] == digest)}


class Reporter:
    """The agent's Kubernetes calls, bounded to ``threads`` at a time; without a client, a no-op."""

    def __init__(self, kube: KubeClient | None, node_name: str, threads: int) -> None:
        self.kube = kube
        self.node_name = node_name
        self.limiter = trio.CapacityLimiter(threads)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call in a worker thread."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)

    async def labels(self, labels: dict[str, str | None]) -> None:
        """Set (or, with None, remove) labels of this node."""
        if self.kube is not None:
            await self.call(self.kube.patch_node_labels, self.node_name, labels)

    async def status(self, namespace: str, name: str, entry: dict[str, Any] | None, *, summary: bool = True) -> None:
        """Server-side apply this node's entry of ``status.nodes`` (None removes it); then, unless ``summary`` is
        False (progress ticks), recount ``status.summary``."""
        if self.kube is None:
            return
        nodes = [{"node": self.node_name, "lastUpdate": timestamp(), **entry}] if entry is not None else []
        try:
            await self.call(self.kube.apply_status, GROUP, VERSION, PLURAL, KIND, namespace, name, {"nodes": nodes},
                            f"{COMPONENT}-{self.node_name}")
            if summary:
                await self.call(self.kube.update_status_summary, GROUP, VERSION, PLURAL, namespace, name,
                                summarize_nodes, f"{COMPONENT}-summary")
        except ModelCacheError as exc:
            log.warning("could not write the status of %s/%s: %s", namespace, name, exc)

    async def event(self, spec: ModelCacheSpec, reason: str, message: str, warning: bool = False) -> None:
        """Record an Event on ``spec``'s object."""
        if self.kube is None:
            return
        involved = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "namespace": spec.namespace,
                    "name": spec.name, "uid": spec.uid}
        try:
            await self.call(self.kube.create_event, involved, reason, message, "Warning" if warning else "Normal",
                            COMPONENT, self.node_name)
        except ModelCacheError as exc:
            log.warning("could not record event %s on %s: %s", reason, spec.owner, exc)

    async def credentials(self, spec: ModelCacheSpec) -> CredentialStore | None:
        """The credentials of ``spec``'s pull secrets (None when it names none)."""
        return await self.call(self._credentials, spec) if spec.pull_secrets else None

    def _credentials(self, spec: ModelCacheSpec) -> CredentialStore:
        assert self.kube is not None
        store = CredentialStore()
        for secret in spec.pull_secrets:
            try:
                data = self.kube.secret_data(spec.namespace, secret)
            except ModelCacheError as exc:
                if exc.kind is not Kind.PERMISSION_DENIED:
                    raise
                raise ModelCacheError(f"{exc}; node agents may read pull secrets only in namespaces an admin "
                                      f"granted: add a RoleBinding to ClusterRole ocimodel-node-pull-secrets in "
                                      f"{spec.namespace}", kind=Kind.PERMISSION_DENIED) from None
            if ".dockerconfigjson" not in data:
                raise ModelCacheError(f"secret {spec.namespace}/{secret} has no .dockerconfigjson key",
                                      kind=Kind.INVALID_ARGUMENT)
            store.add_docker_config(data[".dockerconfigjson"], source=f"secret {spec.namespace}/{secret}")
        return store
