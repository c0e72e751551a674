"""``proxsparse push``: upload a pruned model (one artefact + generated model card) to the Hub in one commit."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    from .common import add_artefact_arg

    p = subparsers.add_parser(
        "push",
        help="Push a pruned model + generated model card to the Hugging Face Hub (one commit)",
        description="Build the chosen artefact and its model card in a temporary folder and upload it to REPO_ID in a "
        "single commit (a failure leaves the repo unchanged). Nothing is uploaded but the regular files the artefact "
        "format defines (a symbolic link in OUTPUT_DIR is refused) and no local path is recorded. Prints the commit "
        "URL. A new repo is PUBLIC unless --private is given; an existing repo keeps its visibility unless --private / "
        "--public is given.",
    )
    p.add_argument("output_dir", help="Output folder written by `proxsparse learn` / `proxsparse prune`")
    p.add_argument("repo_id", help="'namespace/name' (or 'name' for your own namespace)")
    add_artefact_arg(p)
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="Cast weights (dense/compact)"
    )
    visibility = p.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private",
        dest="private",
        action="store_true",
        default=None,
        help="Make the repo private (default for a new repo: public; an existing public repo is made private before "
        "the upload)",
    )
    visibility.add_argument(
        "--public", dest="private", action="store_false", help="Make the repo public (also an existing private one)"
    )
    p.add_argument("--revision", default=None, help="Branch to commit to (created when missing)")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN / the saved login)")
    p.add_argument("--commit-message", default=None, help="Default: 'Upload 2:4 pruned model (<artefact>, <method>)'")
    p.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing")
    p.add_argument("--no-card", dest="card", action="store_false", help="Do not write README.md")
    p.add_argument(
        "--base-model",
        default=None,
        help="Hub id ORG/NAME of the base model, recorded in every file and the card instead of the recorded one "
        "(a local base model is otherwise recorded by name + SHA-256)",
    )
    p.add_argument("--base-revision", default=None, help="Revision of --base-model")
    p.add_argument("--license", default=None, help="Card license (default: inherited from the base model)")
    p.add_argument(
        "--comparison", default=None, help="Comparison.json written by `proxsparse compare` (dense / baseline rows)"
    )
    p.add_argument("--max-retries", type=int, default=3, help="Retries of each step on transient network errors")
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
        base_revision=args.base_revision,
        license=args.license,
        comparison=args.comparison,
        max_retries=args.max_retries,
    )
    print(url)
    return 0
