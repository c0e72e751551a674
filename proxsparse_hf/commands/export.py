"""``proxsparse export``: write one of the three shareable artefacts (dense / compact / mask) from an output folder."""

from __future__ import annotations

import argparse
import json
import logging
import os

logger = logging.getLogger(__name__)

ARTEFACT_CHOICES = ("dense", "compact", "mask")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="write a dense, compact 2:4 or mask-only artefact from an output folder",
        description="Write a shareable artefact of a pruned model: 'dense' (plain transformers checkpoint with "
        "zeros), "
        "'compact' (kept values + packed 2:4 positions, rebuilt bit for bit by proxsparse_hf.load_pruned) or 'mask' "
        "(mask-only adapter applied to the base model by proxsparse_hf.apply_proxsparse). Optionally adds the model "
        "card (README.md + perplexity chart).",
    )
    p.add_argument("output_dir", help="output folder written by `proxsparse learn` / `proxsparse prune`")
    p.add_argument("save_dir", help="destination folder (must be empty unless --overwrite)")
    p.add_argument("--artefact", default="compact", choices=ARTEFACT_CHOICES)
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast weights (dense/compact)"
    )
    p.add_argument(
        "--base-model", default=None, help="mask: base model id recorded in the adapter; card: Hub id of the base"
    )
    p.add_argument("--base-revision", default=None, help="mask: base model revision recorded in the adapter")
    p.add_argument("--card", action="store_true", help="also write README.md (model card) and perplexity.png")
    p.add_argument("--repo-id", default=None, help="repo id used in the card's title and load snippets")
    p.add_argument("--license", default=None, help="card license (default: inherited from the base model)")
    p.add_argument("--comparison", default=None, help="JSON file with dense / baseline results for the card")
    p.add_argument("--overwrite", action="store_true")
    return p


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def run(args: argparse.Namespace) -> int:
    from proxsparse_hf.artefacts.export import resolve_source, save_compact, save_dense, save_mask_adapter

    source = resolve_source(args.output_dir, dtype=args.dtype if args.artefact != "mask" else None)
    if args.artefact == "dense":
        path = save_dense(source, args.save_dir, overwrite=args.overwrite)
    elif args.artefact == "compact":
        path = save_compact(source, args.save_dir, overwrite=args.overwrite)
    else:
        path = save_mask_adapter(
            source,
            args.save_dir,
            base_model_name_or_path=args.base_model,
            revision=args.base_revision,
            overwrite=args.overwrite,
        )
    if args.card:
        from proxsparse_hf.hub.card import save_model_card

        hub_base = (
            args.base_model
            if args.base_model and "/" in args.base_model and not os.path.exists(args.base_model)
            else None
        )
        save_model_card(
            source,
            path,
            artefact=args.artefact,
            repo_id=args.repo_id,
            base_model=hub_base,
            license=args.license,
            comparison=args.comparison,
        )
    summary = {
        "artefact": args.artefact,
        "path": path,
        "size_bytes": _dir_size(path),
        "files": sorted(os.listdir(path)),
    }
    print(json.dumps(summary, indent=2))
    return 0
