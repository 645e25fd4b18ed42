"""``ocimodel cache ls|rm|du|gc|verify``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from modelcache.errors import Kind, ModelCacheError
from modelcache.progress import Progress
from modelcache.upkeep.gc import collect_garbage, find, remove_model, usage
from modelcache.upkeep.verify import verify_cache
from ocimodel.cli.options import EXIT_INTEGRITY, add_common, emit, settings_from_args
from ocimodel.progress import ProgressLine


def cmd_cache_ls(args: argparse.Namespace) -> int:
    """List models in the cache."""
    cache = settings_from_args(args).cache()
    rows: list[dict[str, Any]] = [
        {"key": r.key, "reference": r.reference, "digest": r.digest, "layout": r.layout, "files": r.files,
         "bytes": r.total_bytes, "path": str(cache.exposed_path(r)), "last_used": cache.last_used(r.key)}
        for r in cache.records()]
    text = "\n".join(f"{r['key'][:19]:<20} {r['bytes']:>14,} {r['files']:>6} {r['reference']}" for r in rows)
    emit(args, rows, text or "(cache is empty)")
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
    emit(args, {"removed": removed, "freed_bytes": report.freed_bytes},
          f"removed {len(removed)} model(s), freed {report.freed_bytes:,} bytes")
    return 0


def cmd_cache_du(args: argparse.Namespace) -> int:
    """Show disk use, counting shared files once."""
    result = usage(settings_from_args(args).cache())
    data = {"models": result.models, "blobs": result.blobs, "logical_bytes": result.logical_bytes,
            "disk_bytes": result.disk_bytes, "shared_bytes": result.shared_bytes, "per_model": result.per_model}
    emit(args, data, f"{result.models} models, {result.blobs} blobs; {result.logical_bytes:,} bytes in models, "
                      f"{result.disk_bytes:,} on disk, {result.shared_bytes:,} shared")
    return 0


def cmd_cache_gc(args: argparse.Namespace) -> int:
    """Remove what no model refers to."""
    report = collect_garbage(settings_from_args(args).cache(), dry_run=args.dry_run)
    data = {"dry_run": args.dry_run, "blobs": report.blobs, "layers": report.layers,
            "temporary": report.temporary, "freed_bytes": report.freed_bytes}
    verb = "would free" if args.dry_run else "freed"
    emit(args, data, f"{verb} {report.freed_bytes:,} bytes: {len(report.blobs)} blobs, {len(report.layers)} layers")
    return 0


def cmd_cache_verify(args: argparse.Namespace) -> int:
    """Hash every blob again; report (and with --repair, take out of use) those that no longer match."""
    cache = settings_from_args(args).cache()
    progress = Progress()
    with ProgressLine(progress, "verify"):
        report = verify_cache(cache, repair=args.repair, workers=args.workers, progress=progress)
    data = {"blobs": report.blobs, "bytes": report.bytes, "bad": [asdict(b) for b in report.bad]}
    lines = [f"verified {report.blobs} blobs ({report.bytes:,} bytes): {len(report.bad)} do not match their digest"]
    for bad in report.bad:
        lines.append(f"  {bad.digest}: used by {', '.join(bad.models) or 'no model'}")
        if args.repair:
            lines.append(f"    removed {', '.join(bad.removed_models) or 'nothing'}; "
                         f"kept (in use) {', '.join(bad.kept_models) or 'nothing'}; "
                         f"{'quarantined at ' + bad.quarantined if bad.quarantined else 'blob left in place'}")
    emit(args, data, "\n".join(lines))
    return EXIT_INTEGRITY if report.bad else 0


def register(sub: Any) -> None:
    """Add ``cache`` and its subcommands."""
    cache = sub.add_parser("cache", help="inspect and clean the node cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    ls = cache_sub.add_parser("ls", help="list cached models")
    add_common(ls, registry=False)
    ls.set_defaults(handler=cmd_cache_ls)
    rm = cache_sub.add_parser("rm", help="remove cached models")
    rm.add_argument("models", nargs="+", help="key, digest or reference")
    rm.add_argument("--force", action="store_true", help="remove even if mounted")
    add_common(rm, registry=False)
    rm.set_defaults(handler=cmd_cache_rm)
    du = cache_sub.add_parser("du", help="disk use, shared files counted once")
    add_common(du, registry=False)
    du.set_defaults(handler=cmd_cache_du)
    gc = cache_sub.add_parser("gc", help="remove unreferenced blobs and layers")
    gc.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    add_common(gc, registry=False)
    gc.set_defaults(handler=cmd_cache_gc)
    verify = cache_sub.add_parser("verify", help="hash every blob again; report (or --repair) those that changed")
    verify.add_argument("--repair", action="store_true",
                        help="remove the models that use a bad blob (not mounted ones) and quarantine it")
    verify.add_argument("--workers", type=int, default=4, help="blobs hashed in parallel (default: %(default)s)")
    add_common(verify, registry=False)
    verify.set_defaults(handler=cmd_cache_verify)
