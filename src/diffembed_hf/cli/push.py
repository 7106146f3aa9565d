"""`diffembed push`: validate a DiffEmbed folder (or LoRA adapter) and push it to the Hub with a model card, in
one commit (see `diffembed_hf.publish`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_trust_option


def add_parser(commands) -> None:
    pub = commands.add_parser("push", help="validate a DiffEmbed folder (or LoRA adapter) and push it to the Hub "
                              "with a model card, in one commit (HF_ENDPOINT, HF_TOKEN or the login cache)")
    pub.add_argument("folder", help="a DiffEmbed folder (diffembed convert / train) or a LoRA adapter folder")
    pub.add_argument("repo_id", help="the Hub repo, e.g. my-org/diffembed-dream")
    pub.add_argument("--dry-run", action="store_true", help="check, validate and list the files; send and write "
                     "nothing")
    pub.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    pub.add_argument("--revision", help="branch to push to (created if missing) or refs/pr/N (default: main)")
    pub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    pub.add_argument("--commit-message", help="default: 'Upload DiffEmbed model with diffembed-hf VERSION'")
    pub.add_argument("--token", help="a write token (default: HF_TOKEN, then the `hf auth login` cache)")
    pub.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its local base and push "
                     "the standalone model")
    pub.add_argument("--base-model", help="Hub id of the base model, needed for an adapter whose base is local "
                     "(default: the adapter's base)")
    pub.add_argument("--license", help="licence of the weights for the card (default: the folder's card, else "
                     "apache-2.0)")
    pub.add_argument("--language", nargs="+", help="card languages (default: the folder's card, else en)")
    pub.add_argument("--card", help="push this file as README.md (default: the folder's hand-written README.md, "
                     "else a generated card)")
    pub.add_argument("--write-card", action="store_true", help="also save the generated card as FOLDER/README.md "
                     "(never over a hand-written one without --overwrite-card)")
    pub.add_argument("--overwrite-card", action="store_true", help="generate the card even where the folder has a "
                     "hand-written README.md")
    pub.add_argument("--skip-validation", action="store_true", help="push without loading the folder first")
    pub.add_argument("--eval-results", help="a `diffembed evaluate --output` folder for the card "
                     "(default: FOLDER/eval)")
    add_trust_option(pub, "the folder (validation runs it as a Hub user would)")
    pub.set_defaults(func=run)


def push_options(args: argparse.Namespace):
    """The `PushOptions` of the command line."""
    from ..publish import PushOptions

    return PushOptions(
        token=args.token, private=True if args.private else None, revision=args.revision, create_pr=args.create_pr,
        commit_message=args.commit_message, dry_run=args.dry_run, merge_adapter=args.merge,
        base_model=args.base_model, license=args.license, language=args.language, card=args.card,
        write_card=args.write_card, overwrite_card=args.overwrite_card, validate=not args.skip_validation,
        eval_results=args.eval_results, trust_remote_code=args.trust_remote_code)


def run(args: argparse.Namespace) -> int:
    from ..publish import push

    result = push(args.folder, args.repo_id, push_options(args))
    if args.dry_run:
        checked = "NOT validated" if args.skip_validation else "validated (AutoModel + SentenceTransformer, offline)"
        print(f"Dry run: nothing was sent. {len(result)} files would be pushed to {args.repo_id}, {checked}:")
        print("\n".join(f"  {path}" + ("  (generated model card)" if path == "README.md" and result.card_generated
                                       else "") for path in result))
        if args.write_card:
            print(f"Dry run: {Path(args.folder) / 'README.md'} was not written.")
    else:
        print(f"Pushed {args.folder} to {result.pr_url or result.commit_url}")
    return 0
