"""``proxsparse export``: write one shareable artefact (dense / compact / mask / ...) of an output folder."""

from __future__ import annotations

import argparse
import json
import logging
import os

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    from .common import add_artefact_arg

    p = subparsers.add_parser(
        "export",
        help="Write a dense, compact 2:4 or mask-only artefact from an output folder",
        description="Write a shareable artefact of a pruned model: 'dense' (plain transformers checkpoint with zeros), "
        "'compact' (kept values + packed 2:4 positions, rebuilt bit for bit by proxsparse_hf.load_pruned) or 'mask' "
        "(mask-only adapter applied to the base model by proxsparse_hf.apply_proxsparse). Optionally adds the model "
        "card (README.md + perplexity chart). The folder is built beside the destination and moved into place, so "
        "a failure, Ctrl-C or SIGTERM leaves no partial folder; no local path is written into it. Prints a JSON "
        "summary line.",
    )
    p.add_argument("output_dir", help="Output folder written by `proxsparse learn` / `proxsparse prune`")
    p.add_argument(
        "save_dir", nargs="?", default=None, help="Destination folder (must be empty unless --overwrite); or -o"
    )
    p.add_argument("-o", "--output", dest="save_dir_option", metavar="SAVE_DIR", default=None, help="Same as SAVE_DIR")
    add_artefact_arg(p)
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="Cast weights (dense/compact)"
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="Base model to record in every file and the card: a Hub id ORG/NAME (or a local path, recorded by "
        "name + SHA-256); default: the recorded one",
    )
    p.add_argument("--base-revision", default=None, help="Revision of --base-model")
    p.add_argument("--card", action="store_true", help="Also write README.md (model card) and perplexity.png")
    p.add_argument("--repo-id", default=None, help="Repo id used in the card's title and load snippets")
    p.add_argument("--license", default=None, help="Card license (default: inherited from the base model)")
    p.add_argument(
        "--comparison", default=None, help="Comparison.json written by `proxsparse compare` (dense / baseline rows)"
    )
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty SAVE_DIR (atomically)")
    return p


def run(args: argparse.Namespace) -> int:
    from proxsparse_hf.evaluation import is_output_dir
    from proxsparse_hf.hub.push import build_repo_folder
    from proxsparse_hf.utils import staging_dir

    from .common import check_output_dir

    if (args.save_dir is None) == (args.save_dir_option is None):
        raise ValueError("Give the destination once: as SAVE_DIR or as -o/--output.")
    if not is_output_dir(args.output_dir):
        raise FileNotFoundError(
            f"`output_dir`={args.output_dir!r} is not a proxsparse output folder (no proxsparse_config.json)."
        )
    path = check_output_dir(args.save_dir or args.save_dir_option, overwrite=args.overwrite, flag="SAVE_DIR")
    with staging_dir(path, overwrite=args.overwrite) as staging:
        files = build_repo_folder(
            args.output_dir,
            staging,
            artefact=args.artefact,
            dtype=args.dtype,
            base_model=args.base_model,
            base_revision=args.base_revision,
            card=args.card,
            repo_id=args.repo_id,
            license=args.license,
            comparison=args.comparison,
        )
    summary = {
        "artefact": args.artefact,
        "path": path,
        "size_bytes": sum(os.path.getsize(os.path.join(path, name)) for name in files),
        "files": files,
    }
    print(json.dumps(summary), flush=True)
    return 0
