"""``ocimodel agent`` and ``ocimodel warm``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

from modelcache.errors import Kind, ModelCacheError
from modelcache.registry.reference import parse_reference
from ocimodel.cli.options import add_node_options, exit_now, settings_from_args


def cmd_agent(args: argparse.Namespace) -> int:
    """Run the node agent until SIGTERM."""
    from node_agent.agent import AgentConfig, run_agent
    config = AgentConfig(node_name=args.node_name or os.environ.get("NODE_NAME") or socket.gethostname(),
                         settings=settings_from_args(args), metrics_address=args.metrics_address,
                         evict_interval=args.evict_interval)
    run_agent(config, args.kubeconfig)
    exit_now(0)
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    """Warm, evict, lock or report the page-cache residency of a path or a cached model."""
    from modelcache import pagecache
    target = Path(args.target)
    if not target.exists():
        try:
            parse_reference(args.target)
        except ModelCacheError:
            raise ModelCacheError(f"{args.target} is neither a path nor a model reference",
                                  kind=Kind.INVALID_ARGUMENT) from None
        settings = settings_from_args(args)
        target = settings.cache().pull(args.target).path
    settings = settings_from_args(args)
    if args.evict:
        report = pagecache.evict([target])
    elif args.report:
        report = pagecache.report([target])
    else:
        report = pagecache.warm([target], memory_share=settings.warm_memory_share if args.share is None
                                else args.share)
    data: dict[str, Any] = report.to_json()
    if not args.json:
        data.pop("per_file")
    text = (f"{target}: {report.resident_bytes:,} of {report.total_bytes:,} bytes resident "
            f"({100.0 * report.resident_bytes / max(report.total_bytes, 1):.1f}%) in {len(report.files)} files")
    if report.message:
        text += f"\n{report.message}"
    print(json.dumps(data, indent=2) if args.json else text)
    if args.lock:
        locked = pagecache.LockedFiles([target])
        print(f"locked {locked.bytes:,} bytes in memory; holding until interrupted", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        stop.wait()
        locked.release()
    return 0


def register(sub: Any) -> None:
    """Add ``agent`` and ``warm``."""
    agent = sub.add_parser("agent", help="run the node agent (prefetch, warm, evict, report)")
    agent.add_argument("--node-name", default="",
                       help="the Node this agent serves, whose labels select ModelCache objects (default: $NODE_NAME, "
                            "else the host name)")
    agent.add_argument("--kubeconfig", default="", help="kubeconfig (default: in-cluster; 'none' = no Kubernetes: "
                                                        "only eviction, warm requests and metrics)")
    agent.add_argument("--metrics-address", default="0.0.0.0:9810",
                       help="host:port to serve Prometheus metrics on (default: %(default)s)")
    agent.add_argument("--evict-interval", type=float, default=30.0, metavar="SECONDS",
                       help="how often to check the cache against its watermarks and evict (default: %(default)s)")
    add_node_options(agent)
    agent.set_defaults(handler=cmd_agent, log_level=logging.INFO)

    warm = sub.add_parser("warm", help="page cache: warm (default), --evict, --lock or --report a path or model")
    warm.add_argument("target", help="a file, a directory or a model reference")
    group = warm.add_mutually_exclusive_group()
    group.add_argument("--evict", action="store_true", help="drop from page cache")
    group.add_argument("--report", action="store_true", help="only report residency")
    warm.add_argument("--lock", action="store_true", help="also mlock and hold until interrupted")
    warm.add_argument("--share", type=float, help="share of available memory a warm may use (default: the node "
                                                   "settings' warmMemoryShare, 0.5 unless set)")
    warm.add_argument("--json", action="store_true", help="print JSON, with the residency of every file")
    add_node_options(warm)
    warm.set_defaults(handler=cmd_warm)
