"""`llamaserve` command line: one sub-command per module in `llamaserve.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`, which adds its parser and sets `func` to a
# callable taking the parsed namespace and returning an exit code.
COMMAND_MODULES = (
    "generate",
    "demo",
    "serve",
    "token",
    "eval_alpaca",
    "bench_serve",
    "repack",
    "cache",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaserve", description="Llama 2 / 3 inference server and tools")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"llamaserve.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"llamaserve.commands.{name}":
                raise
            continue  # not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
