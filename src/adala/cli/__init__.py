"""``adala`` command line: a thin layer over the Python API.

Each command group lives in its own small module that exposes ``register(subparsers)``; a command
sets ``func(args) -> int``. Every ``AdalaError`` becomes one line on stderr and its exit code
(2 for user mistakes); anything else is an internal error (exit 1). ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from ..errors import AdalaError

COMMAND_MODULES = ["core", "stages", "bench", "compare", "demo", "export"]


class _Help(argparse.HelpFormatter):
    """Shows each flag's default unless its help already says it: one place, so no flag can forget."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default  # 0 and 0.0 are defaults worth showing (0 == False, so compare by identity)
        shown = not (default is None or default is False or default == [] or default is argparse.SUPPRESS)
        shown = shown and not action.required
        if shown and action.option_strings and "default" not in text.lower() and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks run (run locks released, a checkpoint
    being written discarded whole). A BaseException, like KeyboardInterrupt: no ``except Exception`` in a
    data loader may mistake it for a bad file."""


def _on_sigterm(signum: int, frame) -> None:
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2, like every other user mistake
        self.exit(2, f"adala: error: {message} (see 'adala {self.prog.split()[-1]} --help')\n"
                  if " " in self.prog else f"adala: error: {message} (see 'adala --help')\n")


def build_parser() -> argparse.ArgumentParser:
    # lazy: keeps adala --help fast (no training code at parse time)
    from .. import __version__

    parser = _Parser(prog="adala", description="Linear-attention ViTs from pretrained softmax ViTs (ViT-AdaLA).")
    parser.add_argument("--version", action="version", version=f"adala {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # command group not shipped in this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("adala: %(message)s"))
    logging.getLogger("adala").addHandler(handler)
    logging.getLogger("adala").setLevel(logging.DEBUG if debug else logging.INFO)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version (0) or a usage error (2): return, do not raise
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # lazy: keeps adala --help fast (no training code at parse time)
    from ..runtime import keep_freed_memory

    keep_freed_memory()  # commands are whole processes: reuse big freed blocks (see adala.runtime)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print("adala: terminated (SIGTERM); a training run continues from its last checkpoint with --resume",
              file=sys.stderr)
        return 128 + signal.SIGTERM
    except AdalaError as e:
        if debug:
            raise
        print(f"adala: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("adala: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # internal error: still one line unless --debug
        if debug:
            raise
        print(f"adala: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
