"""The ``proxsparse`` console script: one sub-command per job, each defined in ``proxsparse_hf/commands/<name>.py``.

Every command module exposes ``register(subparsers)`` (adds its parser, cheap to import) and ``run(args) -> int``
(does the work; heavy imports happen there). Shared flags and the checks that run before a model is loaded live in
:mod:`proxsparse_hf.commands.common`.

Exit codes: 0 success; 2 a user error (one line on stderr: ``proxsparse <command>: error: ...``); 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM). An interrupted or terminated run leaves no half-written folder: the ``finally``
blocks of the folder writers remove their staging folders.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

COMMANDS = ("learn", "prune", "eval", "compare", "export", "push")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# libraries that set their own log level; their INFO output (full model configs, GGUF metadata) needs -v
THIRD_PARTY_LOGGERS = ("transformers", "datasets", "gguf", "huggingface_hub", "accelerate")
USER_ERRORS = (ValueError, OSError, KeyError, RuntimeError, ImportError)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM, so that ``finally`` blocks (staging folders, atomic
    writes) clean up before the process exits with 143."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line and exit 2 (the usage itself is in ``--help``)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _add_verbosity(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS if suppress else 0,
        help="More log output: -v shows the INFO messages of transformers / datasets / gguf, -vv DEBUG and tracebacks.",
    )
    parser.add_argument(
        "--log-level",
        default=default,
        choices=LOG_LEVELS,
        help="Level of every logger, this library's and third-party ones (overrides -v).",
    )


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(
        prog="proxsparse",
        description="Learned 2:4 sparsity masks (ProxSparse) for Hugging Face causal LMs. Logs go to stderr, each "
        "command's result to stdout; exit code 2 means a usage error, found before any model is loaded.",
    )
    parser.add_argument("--version", action="version", version=f"proxsparse-hf {__version__}")
    _add_verbosity(parser, suppress=False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        sub = module.register(subparsers)
        _add_verbosity(sub, suppress=True)  # also accepted after the command name
        sub.set_defaults(_run=module.run)
    return parser


def configure_logging(verbose: int = 0, log_level: str | None = None) -> None:
    """This library logs INFO to stderr; transformers, datasets, gguf and every other library only warnings, unless
    ``verbose`` (1: their INFO too, 2: DEBUG everywhere). ``log_level`` sets every logger to that level."""
    own = log_level or ("DEBUG" if verbose >= 2 else "INFO")
    others = log_level or ("DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else "WARNING")
    logging.basicConfig(level=others, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger(__package__).setLevel(own)
    for name in THIRD_PARTY_LOGGERS:  # these set their own levels; -v must reach them
        logging.getLogger(name).setLevel(others)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(getattr(hf_logging, others))  # transformers resets its logger's level on first use


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line: the first line of a third-party ``OSError`` / ``ImportError`` (transformers
    adds paragraphs of advice), all lines joined for the others."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if isinstance(exc, (OSError, ImportError)):
        return lines[0]
    return " ".join(lines)


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the command runs, SIGTERM raises :class:`Terminated` in the main thread (unless the process ignores SIGTERM
    or another handler is installed)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``proxsparse`` console script; returns the exit code (2 for a user error, 130 when
    interrupted, 143 when terminated)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    verbose = getattr(args, "verbose", 0) or 0
    configure_logging(verbose, getattr(args, "log_level", None))
    prog = f"proxsparse {args.command}"
    try:
        with _sigterm_raises():
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    except Terminated:
        sys.stderr.write(f"{prog}: terminated (SIGTERM)\n")
        return EXIT_TERMINATED
    except USER_ERRORS as exc:
        if verbose >= 2 or getattr(args, "log_level", None) == "DEBUG":
            logging.getLogger(__name__).debug("Traceback of the error below:", exc_info=exc)
        parser.exit(EXIT_USER_ERROR, f"{prog}: error: {_one_line(exc)}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
