"""Every Kubernetes API call ocimodel makes, behind one class, with API errors mapped to core errors."""

from __future__ import annotations

import base64
import datetime
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from modelcache.errors import Kind, ModelCacheError

log = logging.getLogger(__name__)


def _error(exc: ApiException, what: str) -> ModelCacheError:
    kind = {401: Kind.UNAUTHENTICATED, 403: Kind.PERMISSION_DENIED, 404: Kind.NOT_FOUND,
            409: Kind.INVALID_ARGUMENT, 422: Kind.INVALID_ARGUMENT}.get(exc.status or 0, Kind.UNAVAILABLE)
    return ModelCacheError(f"{what}: Kubernetes API answered {exc.status} {exc.reason}", kind=kind)


class KubeClient:
    """A thin adapter over the kubernetes client; tests point it at an HTTP fake API server."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> KubeClient:
        """In-cluster config when running in a pod and no kubeconfig is given, else the kubeconfig
        (``$KUBECONFIG`` or ``~/.kube/config``). Neither: a ModelCacheError that says so, in one line."""
        configuration = client.Configuration()
        try:
            if kubeconfig:
                config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            else:
                try:
                    config.load_incluster_config(client_configuration=configuration)
                except config.ConfigException:
                    config.load_kube_config(client_configuration=configuration)
        except (config.ConfigException, OSError, ValueError) as exc:
            where = kubeconfig or "in-cluster service account, $KUBECONFIG or ~/.kube/config"
            raise ModelCacheError(f"no usable Kubernetes configuration ({where}): {exc}",
                                  kind=Kind.INVALID_ARGUMENT) from None
        return cls(client.ApiClient(configuration))

    @classmethod
    def for_url(cls, url: str, token: str = "") -> KubeClient:
        """A client for an API server URL (used by tests and local runs)."""
        configuration = client.Configuration(host=url)
        if token:
            configuration.api_key = {"authorization": f"Bearer {token}"}
        return cls(client.ApiClient(configuration))

    def pvc_annotations(self, namespace: str, name: str) -> dict[str, str]:
        """The annotations of PVC ``namespace/name``."""
        try:
            pvc: Any = self.core.read_namespaced_persistent_volume_claim(name, namespace)
        except ApiException as exc:
            raise _error(exc, f"reading PVC {namespace}/{name}") from None
        annotations = (pvc.metadata.annotations or {}) if pvc.metadata else {}
        return {str(k): str(v) for k, v in annotations.items()}

    def annotate_pvc(self, namespace: str, name: str, key: str, value: str) -> None:
        """Set the annotation ``key`` of PVC ``namespace/name`` with a JSON merge patch."""
        body = {"metadata": {"annotations": {key: value}}}
        try:
            self.core.patch_namespaced_persistent_volume_claim(name, namespace, body,
                                                               _content_type="application/merge-patch+json")
        except ApiException as exc:
            raise _error(exc, f"annotating PVC {namespace}/{name}") from None

    # -- nodes ------------------------------------------------------------------------------------------
    def node_labels(self, node: str) -> dict[str, str]:
        """The labels of Node ``node``."""
        try:
            data: Any = self.core.read_node(node)
        except ApiException as exc:
            raise _error(exc, f"reading node {node}") from None
        return dict(data.metadata.labels or {})

    def patch_node_labels(self, node: str, labels: dict[str, str | None]) -> None:
        """Set (or, with None, remove) labels on Node ``node`` with a JSON merge patch."""
        body = {"metadata": {"labels": labels}}
        try:
            self.core.patch_node(node, body, _content_type="application/merge-patch+json")
        except ApiException as exc:
            raise _error(exc, f"labelling node {node}") from None

    # -- ModelCache objects -----------------------------------------------------------------------------
    def list_modelcaches(self, group: str, version: str, plural: str) -> tuple[list[dict[str, Any]], str]:
        """All ModelCache objects and the list's resourceVersion."""
        try:
            data: Any = self.custom.list_cluster_custom_object(group, version, plural)
        except ApiException as exc:
            raise _error(exc, f"listing {plural}") from None
        return list(data.get("items", [])), str(data.get("metadata", {}).get("resourceVersion", ""))

    def watch_modelcaches(self, group: str, version: str, plural: str, resource_version: str,
                          timeout_seconds: int, stopped: Callable[[], bool]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(event type, object) pairs from a watch starting after ``resource_version``."""
        watcher = watch.Watch()
        try:
            for event in watcher.stream(self.custom.list_cluster_custom_object, group, version, plural,
                                        resource_version=resource_version, timeout_seconds=timeout_seconds,
                                        allow_watch_bookmarks=True):
                if stopped():
                    break
                yield str(event["type"]), event["object"]
        except ApiException as exc:
            raise _error(exc, f"watching {plural}") from None
        finally:
            watcher.stop()

    def apply_status(self, group: str, version: str, plural: str, kind: str, namespace: str, name: str,
                     status: dict[str, Any], field_manager: str) -> None:
        """Server-side apply of ``status`` to the status subresource, owned by ``field_manager``."""
        body = {"apiVersion": f"{group}/{version}", "kind": kind, "metadata": {"name": name, "namespace": namespace},
                "status": status}
        try:
            self.custom.patch_namespaced_custom_object_status(
                group, version, namespace, plural, name, body, field_manager=field_manager,
                force=True, _content_type="application/apply-patch+yaml")
        except ApiException as exc:
            raise _error(exc, f"applying status of {namespace}/{name}") from None

    def update_status_summary(self, group: str, version: str, plural: str, namespace: str, name: str,
                              summarize: Callable[[list[dict[str, Any]]], dict[str, Any]], field_manager: str,
                              attempts: int = 5) -> None:
        """Recompute ``status.summary`` from ``status.nodes`` and write it with a merge patch guarded by the
        object's resourceVersion, so agents writing at once never leave a stale count (409: read again)."""
        for _ in range(attempts):
            try:
                current: Any = self.custom.get_namespaced_custom_object(group, version, namespace, plural, name)
            except ApiException as exc:
                raise _error(exc, f"reading {namespace}/{name}") from None
            status = current.get("status") or {}
            summary = summarize(list(status.get("nodes") or []))
            if status.get("summary") == summary:
                return
            body = {"metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                    "status": {"summary": summary}}
            try:
                self.custom.patch_namespaced_custom_object_status(
                    group, version, namespace, plural, name, body, field_manager=field_manager,
                    _content_type="application/merge-patch+json")
                return
            except ApiException as exc:
                if exc.status != 409:
                    raise _error(exc, f"writing the status summary of {namespace}/{name}") from None
        raise ModelCacheError(f"the status of {namespace}/{name} kept changing; summary left for the next update",
                              kind=Kind.UNAVAILABLE)

    # -- pods (the node plugin's own pod and its mount pods) ------------------------------------------------
    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        """Pod ``namespace/name`` as a JSON-style dict, or None when there is none."""
        try:
            pod = self.core.read_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _error(exc, f"reading pod {namespace}/{name}") from None
        return dict(self.api.sanitize_for_serialization(pod))

    def create_pod(self, namespace: str, body: dict[str, Any]) -> bool:
        """Create a Pod; False when one of that name exists already (409)."""
        try:
            pod: Any = body
            self.core.create_namespaced_pod(namespace, pod)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise _error(exc, f"creating pod {namespace}/{body['metadata']['name']}") from None
        return True

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """The Pods of ``namespace`` that match ``label_selector``, as JSON-style dicts."""
        try:
            pods: Any = self.core.list_namespaced_pod(namespace, label_selector=label_selector)
        except ApiException as exc:
            raise _error(exc, f"listing pods in {namespace}") from None
        return [dict(self.api.sanitize_for_serialization(pod)) for pod in pods.items]

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete Pod ``namespace/name``; one that is gone already is fine."""
        try:
            self.core.delete_namespaced_pod(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise _error(exc, f"deleting pod {namespace}/{name}") from None

    # -- secrets and events -----------------------------------------------------------------------------
    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        """The decoded data of Secret ``namespace/name``."""
        try:
            data: Any = self.core.read_namespaced_secret(name, namespace)
        except ApiException as exc:
            raise _error(exc, f"reading secret {namespace}/{name}") from None
        return {k: base64.b64decode(v).decode() for k, v in (data.data or {}).items()}

    def create_event(self, involved: dict[str, str], reason: str, message: str, event_type: str,
                     component: str, host: str) -> None:
        """Record a core/v1 Event about ``involved`` (apiVersion, kind, namespace, name, uid)."""
        now = datetime.datetime.now(datetime.UTC)
        body: Any = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{involved['name']}.{secrets.token_hex(8)}", "namespace": involved["namespace"]},
            "involvedObject": involved, "reason": reason, "message": message[:1024], "type": event_type,
            "source": {"component": component, "host": host}, "reportingComponent": component,
            "reportingInstance": host, "firstTimestamp": now.isoformat(), "lastTimestamp": now.isoformat(),
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(involved["namespace"], body)
        except ApiException as exc:
            raise _error(exc, f"recording event on {involved['namespace']}/{involved['name']}") from None
