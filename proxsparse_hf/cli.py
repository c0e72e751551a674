"""The ``proxsparse`` console script: one sub-command per job, each defined in ``proxsparse_hf/commands/<name>.py``.

Every command module exposes ``register(subparsers)`` (adds its parser, cheap to import) and ``run(args) -> int``
(does the work; heavy imports happen there).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ("learn", "prune", "eval", "compare", "export", "push")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="proxsparse", description="Learned 2:4 sparsity masks (ProxSparse) for Hugging Face causal LMs."
    )
    parser.add_argument("--version", action="version", version=f"proxsparse-hf {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        sub = module.register(subparsers)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``proxsparse`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity(getattr(hf_logging, args.log_level))
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as exc:
        parser.exit(2, f"proxsparse {args.command}: error: {exc}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
