"""Command-line entry point: ``kvdrive <command> ...``.

argparse lives here and only here. Each command is a module with
``add_parser(subparsers)`` (which registers its options and sets ``func``) and
``run(args) -> int``. User mistakes raise ``KvdriveError`` and are printed on one
line with exit code 2; anything else keeps its traceback because it is a bug.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from kvdrive import __version__
from kvdrive.errors import KvdriveError

# name -> module; order is the order of ``kvdrive --help``.
COMMANDS = {
    "demo": "kvdrive.commands.demo",
    "generate": "kvdrive.commands.generate",
    "info": "kvdrive.commands.info",
    "eval": "kvdrive.commands.eval",
    "probe": "kvdrive.commands.probe",
    "serve": "kvdrive.commands.serve",
    "bench": "kvdrive.bench",
}


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line, like every other kvdrive error (subcommands inherit it)."""

    def error(self, message: str):
        self.exit(
            2,
            f"kvdrive: error: {self.prog.removeprefix('kvdrive').strip() or 'kvdrive'}: {message}"
            f" (see {self.prog} --help)\n",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvdrive",
        description=(
            "Long-context LLM inference with the KV cache tiered over GPU memory, pinned host "
            "DRAM and NVMe SSD. Run 'kvdrive demo' for a first look, 'kvdrive COMMAND --help' "
            "for the options of a command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"kvdrive {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS.values():
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # SIGTERM unwinds like Ctrl-C, so ``with``/``finally`` blocks delete the run's disk extents
    previous = (
        signal.signal(signal.SIGTERM, _terminated) if threading.current_thread() is threading.main_thread() else None
    )
    try:
        return int(args.func(args) or 0)
    except KvdriveError as err:
        print(f"kvdrive: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvdrive: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
