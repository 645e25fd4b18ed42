"""The gRPC server: services per mode, a logging interceptor that redacts secrets, graceful shutdown."""

from __future__ import annotations

import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from csi_driver import DEFAULT_PUBLISH_WAIT, MODES
from csi_driver.attributes import VolumeSpec
from csi_driver.controller import ControllerService, PvcAccess
from csi_driver.errors import CsiError, from_core
from csi_driver.events import CreateEvent, PodEvents
from csi_driver.identity import IdentityService
from csi_driver.lazyservers import PodRunner, ProcessRunner, ServerRunner
from csi_driver.metrics import CsiMetrics
from csi_driver.node import NodeService
from csi_driver.proto import csi_pb2, csi_pb2_grpc
from csi_driver.publications import Publication, Publications
from modelcache.errors import ListenError, ModelCacheError
from modelcache.settings import Settings
from modelcache.singleflight import PullFlights
from modelcache.warmrequests import WarmRequests

log = logging.getLogger(__name__)
OperationHook = Callable[[str, str, float], None]
RPC_THREADS = 64  # a waiting publish holds one (cheap: it sleeps) ...
QUICK_RPC_THREADS = 16  # ... but never these: Probe, unpublish, stats and info always find a free thread
VERDICT_POLL = 2.0  # seconds between looks at what lazy-mount helpers reported
STOP_GRACE = 2.0  # seconds in-flight RPCs get at shutdown (a pod's grace period is 30 s; we use < 10)
PULL_STOP_WAIT = 3.0  # seconds shutdown waits for running pulls to notice
SIGNAL_POLL = 0.2  # seconds between the main thread's looks at pending signals


@dataclass(frozen=True)
class PluginConfig:
    """How ``ocimodel csi`` serves: which services, where, and its tunables."""

    endpoint: str = "unix:///csi/csi.sock"
    node_id: str = ""
    mode: str = "all"
    state_dir: Path | None = None
    publish_wait: float = DEFAULT_PUBLISH_WAIT
    metrics_address: str = ""
    kubeconfig: str = ""  # '' = in-cluster (or ~/.kube/config), 'none' = no Kubernetes API
    pod_name: str = ""  # the plugin's own pod (downward API): lazy volumes are then served by mount pods
    pod_namespace: str = ""


def redact(message: Message) -> Message:
    """A copy of ``message`` with every field marked ``csi_secret`` replaced by ``***``."""
    copy = type(message)()
    copy.CopyFrom(message)
    _redact_in_place(copy)
    return copy


_SECRET: Any = csi_pb2.csi_secret


def _redact_in_place(message: Message) -> None:
    for field, value in message.ListFields():
        if field.GetOptions().Extensions[_SECRET]:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key in list(value):
                    value[key] = "***"
            else:
                message.ClearField(field.name)
        elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if _repeated(field):
                for item in value:
                    _redact_in_place(item)
            else:
                _redact_in_place(value)


def _repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else bool(field.label == field.LABEL_REPEATED)


class ErrorAndLogInterceptor(grpc.ServerInterceptor):
    """Turns service errors into status codes and logs one line per call, never a secret."""

    def __init__(self, on_operation: OperationHook | None = None) -> None:
        self.on_operation = on_operation

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary
        hook = self.on_operation

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.monotonic()
            code = "OK"
            try:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("%s request: %s", method, str(redact(request)).replace("\n", " "))
                return inner(request, context)
            except CsiError as exc:
                code = exc.code.name
                context.abort(exc.code, exc.message)
            except ModelCacheError as exc:
                error = from_core(exc)
                code = error.code.name
                context.abort(error.code, error.message)
            except Exception:
                code = "INTERNAL"
                log.exception("%s failed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"{method}: internal error (see the driver's log)")
            finally:
                elapsed = time.monotonic() - started
                level = logging.INFO if code not in ("OK", "ABORTED") else logging.DEBUG
                log.log(level if method not in ("Probe", "NodeGetCapabilities") else logging.DEBUG,
                         "%s %s in %.1f ms", method, code, elapsed * 1000)
                if hook:
                    hook(method, code, elapsed)

        return grpc.unary_unary_rpc_method_handler(wrapped, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)


@dataclass
class Driver:
    """The running pieces, for tests and the CLI."""

    server: grpc.Server
    identity: IdentityService
    metrics: CsiMetrics
    node: NodeService | None
    controller: ControllerService | None
    pulls: PullFlights | None
    events: PodEvents

    def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop within a few seconds: pulls stop at their next read (their partial downloads resume on the
        next start) so the publishes waiting on them answer at once, then in-flight RPCs get ``grace``."""
        if self.pulls:
            self.pulls.shutdown(timeout=PULL_STOP_WAIT)
        self.server.stop(grace).wait()
        self.events.close()


def _claim_endpoint(endpoint: str) -> str:
    """The gRPC address of ``endpoint`` once it is known to be free (a unix socket no process answers on is a
    previous run's: removed; a tcp port is bound once to try it); :class:`ListenError` when it is not."""
    try:
        if endpoint.startswith("unix://"):
            path = endpoint[len("unix://"):]
            if os.path.exists(path):
                if not stat.S_ISSOCK(os.stat(path).st_mode):
                    raise ListenError(endpoint, "endpoint", "exists and is not a socket")
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(1.0)
                    if probe.connect_ex(path) == 0:
                        raise ListenError(endpoint, "endpoint", "address already in use")
                os.unlink(path)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return f"unix:{path}"
        if endpoint.startswith("tcp://"):
            host, _, port = endpoint[len("tcp://"):].rpartition(":")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            socket.create_server((host.strip("[]"), int(port)), family=family).close()
            return endpoint[len("tcp://"):]
    except ValueError:
        pass
    except OSError as exc:
        raise ListenError(endpoint, "endpoint", os.strerror(exc.errno) if exc.errno else str(exc)) from None
    raise ListenError(endpoint, "endpoint", "must be unix:///path or tcp://host:port")


def build_driver(settings: Settings, config: PluginConfig, *, pvcs: PvcAccess | None = None,
                 create_event: CreateEvent | None = None, runner: ServerRunner | None = None,
                 workers: int = RPC_THREADS) -> Driver:
    """Assemble the services of ``config.mode`` and start serving on ``config.endpoint``. Lazy volumes are
    served by ``runner`` (default: detached local processes)."""
    mode, node_id, endpoint = config.mode, config.node_id or socket.gethostname(), config.endpoint
    state_dir, publish_wait, metrics_address = config.state_dir, config.publish_wait, config.metrics_address
    if mode not in MODES:
        raise SystemExit(f"--mode must be one of {', '.join(MODES)}")
    address = _claim_endpoint(endpoint)  # before anything starts: another plugin may be serving it
    serves_node = mode in ("node", "all")
    serves_controller = mode in ("controller", "all")
    controller_dir = state_dir or settings.root
    state_dirs = ([settings.root] if serves_node else []) + ([controller_dir] if serves_controller else [])
    if serves_node:
        settings.cache().store.ensure()
    identity = IdentityService(list(dict.fromkeys(state_dirs)), needs_mounts=serves_node)
    metrics = CsiMetrics()
    if metrics_address:
        metrics.serve(metrics_address)
        log.info("metrics on port %d", metrics.port)
    server = grpc.server(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
                         interceptors=[ErrorAndLogInterceptor(metrics.observe)],
                         options=[("grpc.so_reuseport", 0)])  # a port another process holds is an error
    csi_pb2_grpc.add_IdentityServicer_to_server(identity, server)
    node = pulls = controller = None
    events = PodEvents(create_event, node_id)
    lost: list[Publication] = []
    if serves_node:
        pulls = PullFlights(settings, metrics=metrics.pulls)
        warm_requests = WarmRequests(settings.root)

        def request_warm(publication: Publication, spec: VolumeSpec) -> None:
            if spec.warm:
                warm_requests.request(publication.key, publication.source)

        node = NodeService(node_id, pulls, Publications(settings.root), publish_wait=publish_wait,
                           on_published=request_warm, lazy=runner or ProcessRunner(settings.root, spare=True),
                           events=events, metrics=metrics, publish_slots=workers - QUICK_RPC_THREADS)
        lost = node.lazy.adopt() if node.lazy else []
        csi_pb2_grpc.add_NodeServicer_to_server(node, server)
    if serves_controller:
        controller = ControllerService(settings, controller_dir, pvcs=pvcs)
        csi_pb2_grpc.add_ControllerServicer_to_server(controller, server)
    try:
        server.add_insecure_port(address)
    except RuntimeError:  # taken since _claim_endpoint looked
        raise ListenError(endpoint, "endpoint", "cannot bind") from None
    server.start()
    if node is not None:
        for target in node.orphans():
            log.warning("orphaned mount at %s shows a cached model but has no record; unmount it by hand or "
                        "let kubelet unpublish it", target)
        for target in node.stale_records():
            log.warning("record for %s has no mount any more; kubelet will publish or unpublish it", target)
    if node is not None and node.lazy is not None:
        for publication in lost:  # each may start a server (seconds): off the start-up path, one thread each
            threading.Thread(target=node.lazy.restore, args=(publication,), name="restore-lazy", daemon=True).start()
        threading.Thread(target=_every, args=(VERDICT_POLL, node.lazy.check_verdicts), name="verdicts",
                         daemon=True).start()
    identity.ready.set()
    log.info("serving %s mode on %s as node %s", mode, endpoint, node_id)
    return Driver(server, identity, metrics, node, controller, pulls, events)


def _every(seconds: float, action: Callable[[], None]) -> None:
    while True:
        time.sleep(seconds)
        try:
            action()
        except Exception:  # noqa: BLE001 - a background check must keep running
            log.exception("%s failed", getattr(action, "__name__", "background check"))


def run_plugin(settings: Settings, config: PluginConfig) -> None:
    """``ocimodel csi``: connect to the Kubernetes API if there is one (for PVC annotation lookups, pod
    events and, given the plugin's own pod, mount pods; without one, warn once and run without them),
    serve until SIGTERM, shut down gracefully."""
    pvcs: PvcAccess | None = None
    create_event: CreateEvent | None = None
    runner: ServerRunner | None = None
    if config.kubeconfig != "none":
        from kubeadapter.client import KubeClient
        try:
            kube = KubeClient.connect(config.kubeconfig or None)
        except ModelCacheError as exc:
            if config.kubeconfig:  # asked for explicitly: a broken kubeconfig is an error
                raise
            log.warning("no Kubernetes API access (%s): running without PVC annotation lookups and pod events; "
                        "pass --kubeconfig=none to silence this", exc)
        else:
            pvcs, create_event = kube, kube.create_event
            if config.pod_name and config.pod_namespace:
                runner = PodRunner(kube, config.pod_namespace, config.pod_name, config.node_id or socket.gethostname(),
                                   settings.root)
                log.info("lazy volumes are served by mount pods in %s", config.pod_namespace)
    serve_forever(build_driver(settings, config, pvcs=pvcs, create_event=create_event, runner=runner))


def serve_forever(driver: Driver) -> None:
    """Block until SIGTERM or SIGINT, then shut down gracefully."""
    stopping = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        log.info("signal %d: shutting down", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    # a timed wait: a signal the kernel hands to another thread (one blocked in a socket read, say) runs its
    # Python handler only once this main thread wakes; an untimed wait left SIGTERM unhandled for 21 s
    while not stopping.is_set():
        stopping.wait(SIGNAL_POLL)
    started = time.monotonic()
    driver.stop()
    log.info("stopped in %.1f s", time.monotonic() - started)
