"""`diffembed` command line: a thin layer over the library functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def _demo(args: argparse.Namespace) -> int:
    from .demo import QUERY, run_demo

    output = args.output or tempfile.mkdtemp(prefix="diffembed-demo-")
    ranking = run_demo(output)
    print(f"DiffEmbed folder: {output}  (untrained default model: the ranking is not meaningful yet)")
    print(f"query: {QUERY}")
    for rank, (score, document) in enumerate(ranking, 1):
        print(f"{rank}. {score:+.4f}  {document}")
    return 0


def _read_texts(source: str, field: str) -> list[str]:
    """One text per line, or one JSON object per line (`.jsonl`) whose `field` holds the text."""
    stream = sys.stdin if source == "-" else open(source, encoding="utf-8")
    with stream:
        lines = stream.read().splitlines()
    if not source.endswith(".jsonl"):
        return lines
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get(field), str):
            raise SystemExit(f"{source}:{number}: no string field {field!r}")
        texts.append(record[field])
    return texts


def _encode(args: argparse.Namespace) -> int:
    from .encoding import encode, load_encoder

    output = Path(args.output)
    if output.suffix not in (".npy", ".safetensors"):
        raise SystemExit(f"--output must end in .npy or .safetensors, got {output}")
    texts = _read_texts(args.input, args.field)
    model = load_encoder(args.model, device=args.device, max_seq_length=args.max_seq_length)
    embeddings = encode(model, texts, prompt_name=args.prompt_name, batch_size=args.batch_size,
                        show_progress_bar=None if args.progress is None else args.progress)
    partial = output.with_name(f".{output.name}.partial")
    if output.suffix == ".npy":
        with open(partial, "wb") as handle:
            np.save(handle, embeddings)
    else:
        from safetensors.numpy import save_file

        save_file({"embeddings": np.ascontiguousarray(embeddings)}, str(partial))
    os.replace(partial, output)  # a reader never sees a half-written file
    print(f"{len(texts)} embeddings of dimension {embeddings.shape[1]} -> {output}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    import signal

    from .convert import ConversionError, convert_checkpoint

    # SIGTERM (kill, a job scheduler) becomes SystemExit, so the half-built temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        output = convert_checkpoint(
            args.source, args.output, family=args.family, overwrite=args.overwrite,
            max_shard_size=args.max_shard_size, max_seq_length=args.max_seq_length, allow_pickle=args.allow_pickle,
            ignore_sliding_window=args.ignore_sliding_window, trust_remote_code=args.trust_remote_code,
            revision=args.revision,
        )
    except ConversionError as err:
        print(f"diffembed convert: error: {err}", file=sys.stderr)
        return 2
    print(f"DiffEmbed folder: {output}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .publish import PublishError, push

    try:
        result = push(
            args.folder, args.repo_id, token=args.token, private=True if args.private else None,
            revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message,
            dry_run=args.dry_run, merge_adapter=args.merge, base_model=args.base_model, license=args.license,
            language=args.language, card=args.card, write_card=args.write_card, validate=not args.skip_validation,
        )
    except PublishError as err:
        print(f"diffembed push: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        checked = "NOT validated" if args.skip_validation else "validated (AutoModel + SentenceTransformer, offline)"
        print(f"Dry run: nothing was sent. {len(result)} files would be pushed to {args.repo_id}, {checked}:")
        print("\n".join(f"  {path}" + ("  (generated model card)" if path == "README.md" else "") for path in result))
    else:
        print(f"Pushed {args.folder} to {result.pr_url or result.commit_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffembed", description="Diffusion language models as text embedders.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build, save, reload (trust_remote_code) and rank with the default model")
    demo.add_argument("--output", help="folder to write the Hub-ready checkpoint to (default: a new temp folder)")
    demo.set_defaults(func=_demo)

    enc = commands.add_parser("encode", help="embed texts from a file or stdin into a .npy or .safetensors file")
    enc.add_argument("model", help="a DiffEmbed folder or Hub id")
    enc.add_argument("--input", "-i", default="-", help="text file (one text per line), .jsonl, or - for stdin")
    enc.add_argument("--field", default="text", help="the text field of .jsonl records (default: text)")
    enc.add_argument("--output", "-o", required=True, help="embeddings file: .npy or .safetensors")
    enc.add_argument("--prompt-name", help="a prompt stored with the model, e.g. query (default: none)")
    enc.add_argument("--batch-size", type=int, default=32)
    enc.add_argument("--max-seq-length", type=int, help="override the model's maximum length in tokens")
    enc.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    enc.add_argument("--progress", action=argparse.BooleanOptionalAction, help="force the progress bar on/off")
    enc.set_defaults(func=_encode)

    conv = commands.add_parser("convert", help="convert a Dream / LLaDA / Qwen2 / Llama / Mistral checkpoint "
                               "into a Hub-ready DiffEmbed folder")
    conv.add_argument("source", help="a local checkpoint folder or a Hub id")
    conv.add_argument("output", help="the folder to create")
    conv.add_argument("--family", choices=["dream", "llada", "qwen2", "llama", "mistral"],
                      help="force the source family (default: from config.json's model_type)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT once the new folder is complete")
    conv.add_argument("--max-shard-size", default="5GB", help="output shard size cap, e.g. 5GB or 500MiB")
    conv.add_argument("--max-seq-length", type=int,
                      help="sentence-transformers truncation length (default: min(max positions, 4096))")
    conv.add_argument("--allow-pickle", action="store_true",
                      help="accept .bin weights, loaded with torch.load(weights_only=True)")
    conv.add_argument("--ignore-sliding-window", action="store_true",
                      help="convert a sliding-window source (e.g. Mistral v0.1) to full attention")
    conv.add_argument("--trust-remote-code", action="store_true", help="let a remote-code tokenizer run its code")
    conv.add_argument("--revision", help="Hub revision (branch, tag or commit) for a Hub id")
    conv.set_defaults(func=_convert)

    pub = commands.add_parser("push", help="validate a DiffEmbed folder (or LoRA adapter) and push it to the Hub "
                              "with a model card, in one commit (HF_ENDPOINT, HF_TOKEN or the login cache)")
    pub.add_argument("folder", help="a DiffEmbed folder (diffembed convert / train) or a LoRA adapter folder")
    pub.add_argument("repo_id", help="the Hub repo, e.g. my-org/diffembed-dream")
    pub.add_argument("--dry-run", action="store_true", help="check, validate and list the files; send nothing")
    pub.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    pub.add_argument("--revision", help="branch to push to (created if missing) or refs/pr/N")
    pub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    pub.add_argument("--commit-message", help="default: 'Upload DiffEmbed model with diffembed-hf VERSION'")
    pub.add_argument("--token", help="a write token (default: HF_TOKEN, then the `hf auth login` cache)")
    pub.add_argument("--merge", action="store_true", help="merge a LoRA adapter into its local base and push "
                     "the standalone model")
    pub.add_argument("--base-model", help="Hub id of the base model (needed for an adapter whose base is local)")
    pub.add_argument("--license", help="licence of the weights for the card (default: the folder's card, else "
                     "apache-2.0)")
    pub.add_argument("--language", nargs="+", help="card languages (default: the folder's card, else en)")
    pub.add_argument("--card", help="push this file as README.md instead of the generated card")
    pub.add_argument("--write-card", action="store_true", help="also save the generated card as FOLDER/README.md")
    pub.add_argument("--skip-validation", action="store_true", help="push without loading the folder first")
    pub.set_defaults(func=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
