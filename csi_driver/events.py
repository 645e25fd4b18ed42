"""Kubernetes Events on the pods whose volumes this plugin serves, sent off the RPC threads."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from modelcache.errors import ModelCacheError

log = logging.getLogger(__name__)
COMPONENT = "ocimodel-csi"

# (involved object, reason, message, type, component, host): KubeClient.create_event's signature
CreateEvent = Callable[[dict[str, str], str, str, str, str, str], None]


class PodEvents:
    """Records Events on pods through ``create`` (None: log only). One worker thread sends them, so a
    slow API server never holds an RPC; a failed send is logged and dropped."""

    def __init__(self, create: CreateEvent | None, node_id: str) -> None:
        self.create = create
        self.node_id = node_id
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="events") if create else None

    def warn(self, pod: tuple[str, str, str], reason: str, message: str) -> None:
        """A Warning Event on ``pod`` (namespace, name, uid); logged too."""
        namespace, name, uid = pod
        log.warning("%s on pod %s/%s: %s", reason, namespace or "?", name or "?", message)
        if self._sender is None or not (namespace and name):
            return
        involved = {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name}
        if uid:
            involved["uid"] = uid
        self._sender.submit(self._send, involved, reason, message)

    def _send(self, involved: dict[str, str], reason: str, message: str) -> None:
        assert self.create is not None
        try:
            self.create(involved, reason, message, "Warning", COMPONENT, self.node_id)
        except ModelCacheError as exc:
            log.warning("could not record event %s on %s/%s: %s", reason, involved["namespace"], involved["name"],
                        exc)

    def close(self) -> None:
        """Stop taking events; what is queued is sent while the process lives (never waited for)."""
        if self._sender is not None:
            self._sender.shutdown(wait=False, cancel_futures=False)
