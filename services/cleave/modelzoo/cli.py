"""``cleave model``: build, list and locate the named models."""

from __future__ import annotations

import argparse
import sys

from . import registry


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``model`` and its subcommands on an argparse ``subparsers`` object."""
    parser = subparsers.add_parser("model", help="build, list and locate models")
    _add_subcommands(parser)
    return parser


def _add_subcommands(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{build,list,path}")
    build = sub.add_parser("build", help="build a named model into the cache (no-op if built)")
    build.add_argument("name", help=", ".join(registry.list_models()))
    build.add_argument("--force", action="store_true", help="rebuild even if the cache has it")
    sub.add_parser("list", help="list the named models and whether each is built")
    path = sub.add_parser("path", help="print a model's folder, building it first if needed")
    path.add_argument("name")
    path.add_argument("--no-build", action="store_true", help="print where it would be; build nothing")


def run_command(command: str, argv: list[str]) -> int:
    """Entry point used by ``cleave model ...``; returns the exit status."""
    parser = argparse.ArgumentParser(prog=f"cleave {command}", description="Build, list and locate models.")
    _add_subcommands(parser)
    args = parser.parse_args(argv)
    try:
        if args.action == "list":
            print(f"cache: {registry.cache_dir()}")
            for name, spec in registry.MODELS.items():
                state = "built" if registry.is_built(name) else "not built"
                print(f"{name:24} {state:10} {spec.description}")
            return 0
        if args.action == "build":
            print(registry.resolve(args.name, force=args.force))
            return 0
        if args.action == "path":
            if args.no_build:
                print(registry.model_path(args.name))
            else:
                print(registry.resolve(args.name))
            return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"cleave {command}: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown action {args.action!r}")
    return 2
