"""`llamaserve` command line: one sub-command per module in `llamaserve.commands`."""

from __future__ import annotations

import argparse
import importlib
import logging
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


FLAG_WINS = "A flag given on the command line wins over its environment variable."


class _ShowsDefaults:
    """Appends "(default: X)" to a flag's help unless the help already says its default; mixed
    into each command's own formatter class, so raw epilogs stay raw."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is argparse.SUPPRESS or isinstance(d, bool) or d == []:
            return text
        return f"{text} (default: %(default)s)"


def _polish(parser: argparse.ArgumentParser) -> None:
    """Every command's --help: defaults shown, and the precedence rule where flags have env vars."""
    parser.formatter_class = type("Formatter", (_ShowsDefaults, parser.formatter_class), {})
    if any("env " in (a.help or "") for a in parser._actions) and "wins" not in (parser.epilog or ""):
        parser.epilog = f"{parser.epilog}\n{FLAG_WINS}" if parser.epilog else FLAG_WINS


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamaserve", description="Llama 2 / 3 inference server and tools. "
                                     + FLAG_WINS)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"llamaserve.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"llamaserve.commands.{name}":
                raise
            continue  # not built yet
        module.register(subparsers)
    for sub in subcommand_parsers(parser).values():
        _polish(sub)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tests and tools swap it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _progress_to_stderr() -> None:
    """Progress lines (llamaserve.progress, used when stderr is not a terminal) on stderr for
    the commands; `serve` logs them with everything else instead."""
    logger = logging.getLogger("llamaserve.progress")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s llamaserve: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command != "serve":
        _progress_to_stderr()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
