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
    from .demo import run_demo

    output = args.output or tempfile.mkdtemp(prefix="diffembed-demo-")
    result = run_demo(output, max_steps=args.max_steps, max_heldout=args.max_heldout)
    print(f"Held-out retrieval: {result.heldout_rows} docstring summaries -> their functions' source, from standard "
          f"library modules not seen in training ({result.train_rows} training rows).")
    print(f"{'model':<24}{'nDCG@10':>9}{'MRR@10':>9}{'R@1':>7}{'R@10':>7}")
    for name, metrics in result.metrics.items():
        print(f"{name:<24}{metrics['ndcg@10']:>9.4f}{metrics['mrr@10']:>9.4f}{metrics['recall@1']:>7.3f}"
              f"{metrics['recall@10']:>7.3f}")
    print(f"fine-tuning: loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}, "
          f"{result.train_seconds / 60:.1f} min on {os.cpu_count()} CPU cores")
    print(f"Hub-ready folder (reloaded with AutoModel and SentenceTransformer, trust_remote_code): {result.folder}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .data import ColumnMapping
    from .train import TrainingConfig, train

    overrides = {key: value for key, value in {
        "max_steps": args.max_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "max_seq_length": args.max_seq_length, "gradcache_mini_batch_size": args.gradcache,
        "lora": False if args.full else None, "adapter_only": args.adapter_only or None,
        "group_by_instruction": args.group_by_instruction or None, "eval_fraction": args.eval_fraction,
    }.items() if value is not None}
    config = TrainingConfig.from_file(args.config, **overrides) if args.config else TrainingConfig(**overrides)
    mapping = ColumnMapping(query=args.query_column, positive=args.positive_column,
                            negatives=args.negative_column or [], instruction=args.instruction_column)
    result = train(args.model, args.data, args.output, config, mapping=mapping, eval_data=args.eval_data,
                   overwrite=args.overwrite, resume=args.resume, device=args.device)
    if result.metrics_after:
        for name, metrics in (("before", result.metrics_before), ("after", result.metrics_after)):
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"model written to {result.output_dir}")
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
    model = load_encoder(args.model, device=args.device, max_seq_length=args.max_seq_length, quantize=args.quantize)
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
    demo = commands.add_parser("demo", help="fine-tune and evaluate the default model on a standard-library task")
    demo.add_argument("--output", help="folder for the task, the models and the Hub-ready checkpoint (default: temp)")
    demo.add_argument("--max-steps", type=int, help="training steps (default: 400)")
    demo.add_argument("--max-heldout", type=int, default=300, help="held-out rows to evaluate on (default: 300)")
    demo.set_defaults(func=_demo)

    tr = commands.add_parser("train", help="contrastive fine-tuning with the DiffEmbed recipe (LoRA, InfoNCE x 50)")
    tr.add_argument("model", help="a DiffEmbed folder or Hub id")
    tr.add_argument("data", help="training rows: .jsonl / .csv / .parquet, or a Hub dataset id")
    tr.add_argument("output", help="folder to write the fine-tuned, Hub-ready model to")
    tr.add_argument("--config", help="JSON file of TrainingConfig fields; flags below override it")
    tr.add_argument("--max-steps", type=int)
    tr.add_argument("--batch-size", type=int, help="per device")
    tr.add_argument("--learning-rate", type=float)
    tr.add_argument("--max-seq-length", type=int)
    tr.add_argument("--gradcache", type=int, metavar="MINI_BATCH", help="GradCache with this mini-batch size")
    tr.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    tr.add_argument("--adapter-only", action="store_true", help="save only the LoRA adapter (not merged)")
    tr.add_argument("--group-by-instruction", action="store_true", help="one instruction per batch")
    tr.add_argument("--eval-data", help="held-out rows (default: --eval-fraction of the training rows)")
    tr.add_argument("--eval-fraction", type=float)
    tr.add_argument("--query-column")
    tr.add_argument("--positive-column")
    tr.add_argument("--negative-column", action="append", help="repeat for several negative columns")
    tr.add_argument("--instruction-column")
    tr.add_argument("--overwrite", action="store_true")
    tr.add_argument("--resume", action="store_true", help="continue from the last checkpoint of an interrupted run")
    tr.add_argument("--device")
    tr.set_defaults(func=_train)

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
    enc.add_argument("--quantize", choices=["fp8"], help="FP8 linear layers (CUDA, compute capability >= 8.9; "
                     "pip install 'diffembed-hf[fp8]')")
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
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:  # libraries that set their own loggers to DEBUG stay quiet too
        handler.setLevel(level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
