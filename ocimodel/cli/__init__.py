"""``ocimodel``: every command line of the project. One module per command group (``models``: pull and
push; ``cache``; ``csi``: the plugin, mount, umount and the FUSE helpers; ``agent``: the node agent and
warm) parses arguments into typed settings and calls the packages that do the work."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from modelcache import __version__
from modelcache.errors import ListenError, ModelCacheError
from ocimodel.cli import agent, cache, csi, models
from ocimodel.cli.options import EXIT_CODES

Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser: one module per command group registers its subcommands."""
    parser = argparse.ArgumentParser(prog="ocimodel", description="AI models from OCI registries, on nodes.")
    parser.add_argument("--version", action="version", version=f"ocimodel {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more: -v for INFO, -vv for DEBUG (default: warnings only; services log INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (models, cache, csi, agent):
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ocimodel`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # services (csi, agent, fuse-serve) log one INFO line per operation by default; commands only warnings
    base = getattr(args, "log_level", logging.WARNING)
    logging.basicConfig(level=max(base - 10 * min(args.verbose, 2), logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler: Handler = args.handler
    try:
        return handler(args)
    except ModelCacheError as exc:
        return _failed(exc)
    except BaseExceptionGroup as group:  # the agent's trio nurseries wrap what its services raise
        core, rest = group.split(ModelCacheError)
        if core is None or rest is not None:
            raise
        first: BaseException = core
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        assert isinstance(first, ModelCacheError)
        return _failed(first)
    except KeyboardInterrupt:
        return 130


def _failed(exc: ModelCacheError) -> int:
    """Say on one line what went wrong (for an address that cannot be listened on: which option named it)
    and return the exit status of its kind."""
    if isinstance(exc, ListenError):
        print(f"ocimodel: --{exc.setting.replace('_', '-')} {exc.address}: {exc.reason}", file=sys.stderr)
    else:
        print(f"ocimodel: {exc.kind.value}: {exc}", file=sys.stderr)
    return EXIT_CODES.get(exc.kind, 1)


if __name__ == "__main__":
    sys.exit(main())
