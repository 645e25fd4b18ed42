"""``ocimodel``: pull, push, cache management; the CSI driver and node agent are subcommands too."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelcache import __version__
from modelcache.cliopts import add_node_options, settings_from_args
from modelcache.credentials import Credentials, CredentialStore
from modelcache.errors import Kind, ModelCacheError
from modelcache.gc import collect_garbage, find, remove_model, usage
from modelcache.mediatypes import Compression
from modelcache.pull import Progress, PullOptions
from modelcache.push import push_directory
from modelcache.reference import parse_reference
from modelcache.registry import RegistryClient
from ocimodel.progress import ProgressLine

EXIT_CODES = {Kind.INVALID_ARGUMENT: 2, Kind.NOT_FOUND: 3, Kind.UNAUTHENTICATED: 4, Kind.PERMISSION_DENIED: 4,
              Kind.UNAVAILABLE: 5, Kind.INTEGRITY: 6, Kind.UNSAFE_CONTENT: 6, Kind.RESOURCE_EXHAUSTED: 7,
              Kind.UNSUPPORTED: 8, Kind.INTERNAL: 1}
Handler = Callable[[argparse.Namespace], int]


def _explicit_credentials(args: argparse.Namespace, reference: str) -> CredentialStore | None:
    username = getattr(args, "username", None)
    if not username:
        return None
    if getattr(args, "password_stdin", False):
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = os.environ.get("OCIMODEL_PASSWORD", "")
    store = CredentialStore()
    store.add(parse_reference(reference).endpoint_host, Credentials(username, password))
    return store


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(text)


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull a reference into the cache and print where it is."""
    settings = settings_from_args(args)
    cache = settings.cache(_explicit_credentials(args, args.reference))
    options = PullOptions(tuple(args.include or ()), tuple(args.exclude or ()), args.path)
    progress = Progress()
    with ProgressLine(progress, args.reference):
        result = cache.pull(args.reference, options, progress)
    data = result.to_json()
    if args.list_files:
        data["file_list"] = sorted(str(p.relative_to(result.path)) for p in result.path.rglob("*") if p.is_file())
    text = "\n".join(f"{k}: {v}" for k, v in data.items() if k != "file_list")
    _emit(args, data, text)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Pack a directory as a ModelPack artifact and push it."""
    settings = settings_from_args(args)
    ref = parse_reference(args.reference)
    client = RegistryClient(settings.transport(_explicit_credentials(args, args.reference)))
    digest = push_directory(client, Path(args.directory), ref, compression=Compression(args.layer_format),
                            progress=(lambda m: print(m, file=sys.stderr)) if sys.stderr.isatty() else None)
    _emit(args, {"reference": str(ref), "digest": str(digest)}, f"pushed {ref}@{digest}")
    return 0


def cmd_cache_ls(args: argparse.Namespace) -> int:
    """List models in the cache."""
    cache = settings_from_args(args).cache()
    rows: list[dict[str, Any]] = [
        {"key": r.key, "reference": r.reference, "digest": r.digest, "layout": r.layout, "files": r.files,
         "bytes": r.total_bytes, "path": str(cache.exposed_path(r)), "last_used": cache.last_used(r.key)}
        for r in cache.records()]
    text = "\n".join(f"{r['key'][:19]:<20} {r['bytes']:>14,} {r['files']:>6} {r['reference']}" for r in rows)
    _emit(args, rows, text or "(cache is empty)")
    return 0


def cmd_cache_rm(args: argparse.Namespace) -> int:
    """Remove models (by key, digest or reference) and collect their unreferenced blobs."""
    cache = settings_from_args(args).cache()
    removed = []
    for target in args.models:
        matches = find(cache, target)
        if not matches:
            raise ModelCacheError(f"no cached model matches {target!r}", kind=Kind.NOT_FOUND)
        for record in matches:
            remove_model(cache, record.key, force=args.force)
            removed.append(record.key)
    report = collect_garbage(cache)
    _emit(args, {"removed": removed, "freed_bytes": report.freed_bytes},
          f"removed {len(removed)} model(s), freed {report.freed_bytes:,} bytes")
    return 0


def cmd_cache_du(args: argparse.Namespace) -> int:
    """Show disk use, counting shared files once."""
    result = usage(settings_from_args(args).cache())
    data = {"models": result.models, "blobs": result.blobs, "logical_bytes": result.logical_bytes,
            "disk_bytes": result.disk_bytes, "shared_bytes": result.shared_bytes, "per_model": result.per_model}
    _emit(args, data, f"{result.models} models, {result.blobs} blobs; {result.logical_bytes:,} bytes in models, "
                      f"{result.disk_bytes:,} on disk, {result.shared_bytes:,} shared")
    return 0


def cmd_cache_gc(args: argparse.Namespace) -> int:
    """Remove what no model refers to."""
    report = collect_garbage(settings_from_args(args).cache(), dry_run=args.dry_run)
    data = {"dry_run": args.dry_run, "blobs": report.blobs, "layers": report.layers,
            "temporary": report.temporary, "freed_bytes": report.freed_bytes}
    verb = "would free" if args.dry_run else "freed"
    _emit(args, data, f"{verb} {report.freed_bytes:,} bytes: {len(report.blobs)} blobs, {len(report.layers)} layers")
    return 0


def _common(parser: argparse.ArgumentParser, *, registry: bool = True) -> None:
    add_node_options(parser, registry=registry)
    parser.add_argument("--json", action="store_true", help="print JSON")
    if registry:
        parser.add_argument("--username", help="registry user (password from --password-stdin or $OCIMODEL_PASSWORD)")
        parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")


def build_parser(extensions: Sequence[Callable[[Any], None]] = ()) -> argparse.ArgumentParser:
    """The full argument parser; front ends add their subcommands through ``extensions``."""
    parser = argparse.ArgumentParser(prog="ocimodel", description="AI models from OCI registries, on nodes.")
    parser.add_argument("--version", action="version", version=f"ocimodel {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    pull = sub.add_parser("pull", help="pull a model into the node cache")
    pull.add_argument("reference")
    pull.add_argument("--include", action="append", help="glob of files to keep (repeatable)")
    pull.add_argument("--exclude", action="append", help="glob of files to drop (repeatable)")
    pull.add_argument("--path", help="sub-path to expose (container images: default /models)")
    pull.add_argument("--list-files", action="store_true", help="include the file list")
    _common(pull)
    pull.set_defaults(handler=cmd_pull)

    push = sub.add_parser("push", help="push a directory as a ModelPack artifact")
    push.add_argument("directory")
    push.add_argument("reference")
    push.add_argument("--layer-format", choices=[c.value for c in Compression], default="raw",
                      help="how each file is stored (model-spec recommends raw)")
    _common(push)
    push.set_defaults(handler=cmd_push)

    cache = sub.add_parser("cache", help="inspect and clean the node cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    ls = cache_sub.add_parser("ls", help="list cached models")
    _common(ls, registry=False)
    ls.set_defaults(handler=cmd_cache_ls)
    rm = cache_sub.add_parser("rm", help="remove cached models")
    rm.add_argument("models", nargs="+", help="key, digest or reference")
    rm.add_argument("--force", action="store_true", help="remove even if mounted")
    _common(rm, registry=False)
    rm.set_defaults(handler=cmd_cache_rm)
    du = cache_sub.add_parser("du", help="disk use, shared files counted once")
    _common(du, registry=False)
    du.set_defaults(handler=cmd_cache_du)
    gc = cache_sub.add_parser("gc", help="remove unreferenced blobs and layers")
    gc.add_argument("--dry-run", action="store_true")
    _common(gc, registry=False)
    gc.set_defaults(handler=cmd_cache_gc)

    for extend in extensions:
        extend(sub)
    return parser


def _extensions() -> list[Callable[[Any], None]]:
    from csi_driver.cli import register as register_csi
    from node_agent.cli import register as register_agent
    return [register_csi, register_agent]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ocimodel`` console script."""
    parser = build_parser(_extensions())
    args = parser.parse_args(argv)
    # services (csi, agent, fuse-launcher) log one INFO line per operation by default; commands only warnings
    base = getattr(args, "log_level", logging.WARNING)
    logging.basicConfig(level=max(base - 10 * min(args.verbose, 2), logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except ModelCacheError as exc:
        print(f"ocimodel: {exc.kind.value}: {exc}", file=sys.stderr)
        return EXIT_CODES.get(exc.kind, 1)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
