"""Every Kubernetes API call ocimodel makes, behind one class, with API errors mapped to core errors."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client, config
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

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> KubeClient:
        """In-cluster config when running in a pod and no kubeconfig is given, else the kubeconfig."""
        if kubeconfig:
            configuration = client.Configuration()
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            try:
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                configuration = client.Configuration()
                config.load_kube_config(client_configuration=configuration)
        return cls(client.ApiClient(configuration))

    @classmethod
    def for_url(cls, url: str, token: str = "") -> KubeClient:
        """A client for an API server URL (used by tests and local runs)."""
        configuration = client.Configuration(host=url)
        if token:
            configuration.api_key = {"authorization": f"Bearer {token}"}
        return cls(client.ApiClient(configuration))

    def pvc_annotation(self, namespace: str, name: str, key: str) -> str | None:
        """The annotation ``key`` of PVC ``namespace/name``, or None."""
        try:
            pvc: Any = self.core.read_namespaced_persistent_volume_claim(name, namespace)
        except ApiException as exc:
            raise _error(exc, f"reading PVC {namespace}/{name}") from None
        annotations = (pvc.metadata.annotations or {}) if pvc.metadata else {}
        value = annotations.get(key)
        return str(value) if value else None
