"""``ocimodel pull`` and ``ocimodel push``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from modelcache.mediatypes import Compression
from modelcache.options import PullOptions
from modelcache.progress import Progress
from modelcache.push import push_directory
from modelcache.reference import parse_reference
from modelcache.registry import RegistryClient
from ocimodel.cli.options import add_common, emit, explicit_credentials, settings_from_args
from ocimodel.progress import ProgressLine


def cmd_pull(args: argparse.Namespace) -> int:
    """Pull a reference into the cache and print where it is."""
    settings = settings_from_args(args)
    cache = settings.cache(explicit_credentials(args, args.reference))
    options = PullOptions(tuple(args.include or ()), tuple(args.exclude or ()), args.path)
    progress = Progress()
    with ProgressLine(progress, args.reference):
        result = cache.pull(args.reference, options, progress)
    data = result.to_json()
    if args.list_files:
        data["file_list"] = sorted(str(p.relative_to(result.path)) for p in result.path.rglob("*") if p.is_file())
    text = "\n".join(f"{k}: {v}" for k, v in data.items() if k != "file_list")
    emit(args, data, text)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """Pack a directory as a ModelPack artifact and push it."""
    settings = settings_from_args(args)
    ref = parse_reference(args.reference)
    client = RegistryClient(settings.transport(explicit_credentials(args, args.reference)))
    digest = push_directory(client, Path(args.directory), ref, compression=Compression(args.layer_format),
                            progress=(lambda m: print(m, file=sys.stderr)) if sys.stderr.isatty() else None)
    emit(args, {"reference": str(ref), "digest": str(digest)}, f"pushed {ref}@{digest}")
    return 0


def register(sub: Any) -> None:
    """Add ``pull`` and ``push``."""
    pull = sub.add_parser("pull", help="pull a model into the node cache")
    pull.add_argument("reference")
    pull.add_argument("--include", action="append", help="glob of files to keep (repeatable)")
    pull.add_argument("--exclude", action="append", help="glob of files to drop (repeatable)")
    pull.add_argument("--path", help="sub-path to expose (container images: default /models)")
    pull.add_argument("--list-files", action="store_true", help="include the file list")
    add_common(pull)
    pull.set_defaults(handler=cmd_pull)

    push = sub.add_parser("push", help="push a directory as a ModelPack artifact")
    push.add_argument("directory")
    push.add_argument("reference")
    push.add_argument("--layer-format", choices=[c.value for c in Compression], default="raw",
                      help="how each file is stored (model-spec recommends raw)")
    add_common(push)
    push.set_defaults(handler=cmd_push)
