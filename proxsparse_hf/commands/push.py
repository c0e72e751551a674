"""``proxsparse push``: upload a pruned model (one artefact + generated model card) to the Hub in one commit."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "push",
        help="push a pruned model + generated model card to the Hugging Face Hub (one commit)",
        description="Build the chosen artefact and its model card in a temporary folder and upload it to REPO_ID in a "
        "single commit (a failure leaves the repo unchanged). Prints the commit URL.",
    )
    p.add_argument("output_dir", help="output folder written by `proxsparse learn` / `proxsparse prune`")
    p.add_argument("repo_id", help="'namespace/name' (or 'name' for your own namespace)")
    p.add_argument("--artefact", default="dense", choices=["dense", "compact", "mask"])
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast weights (dense/compact)"
    )
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private", dest="private", action="store_true", default=None, help="create a private repo"
    )
    visibility.add_argument("--public", dest="private", action="store_false", help="create a public repo")
    p.add_argument("--revision", default=None, help="branch to commit to (created when missing)")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the saved login)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--no-card", dest="card", action="store_false", help="do not write README.md")
    p.add_argument("--base-model", default=None, help="Hub id of the base model for the card (if recorded as a path)")
    p.add_argument("--license", default=None, help="card license (default: inherited from the base model)")
    p.add_argument("--comparison", default=None, help="JSON file with dense / baseline results for the card")
    p.add_argument("--max-retries", type=int, default=3, help="retries of each step on transient network errors")
    return p


def run(args: argparse.Namespace) -> int:
    from proxsparse_hf.hub.push import push_pruned_to_hub

    url = push_pruned_to_hub(
        args.output_dir,
        args.repo_id,
        artefact=args.artefact,
        private=args.private,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        dtype=args.dtype,
        card=args.card,
        base_model=args.base_model,
        license=args.license,
        comparison=args.comparison,
        max_retries=args.max_retries,
    )
    print(url)
    return 0
