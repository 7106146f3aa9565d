"""`diffembed` command line: a thin layer over the library functions.

Each subcommand is a `_name(args)` function registered in `build_parser`; it imports what it needs when it
runs, so `diffembed --help` imports neither torch nor transformers. A user mistake is raised as
`errors.UsageError` (exit status 2) or `errors.DiffembedError` (exit status 1) and `main` prints it as one line,
`diffembed <cmd>: error: ...` (`--debug` adds the traceback). Numeric options use the argparse types below
(`positive_int`, `fraction`, ...), so a bad value is refused before any work, naming the option and the range.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

from . import __version__
from .errors import DiffembedError, UsageError, require_extra

# ----------------------------------------------------------------------------------------------------------
# Argument types: a bad value is an argparse error naming the option and the accepted range (exit status 2)
# ----------------------------------------------------------------------------------------------------------


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1 (steps, batch sizes, lengths, counts)."""
    value = _number(text, int, "an integer >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, scales)."""
    value = _number(text, float, "a number > 0")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1) (a share of the rows, e.g. held out for evaluation)."""
    value = _number(text, float, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def byte_size(text: str) -> str:
    """A size in bytes, e.g. 5GB or 500MiB (> 0); kept as text for the library to read."""
    from .files import parse_size

    try:
        parse_size(text)
    except DiffembedError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


class HelpFormatter(argparse.HelpFormatter):
    """Shows every option's default; options whose default depends on something else say so in their help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and "default" not in text and action.default not in (None, False)
                and action.default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the defaults shown; subcommand parsers are built from this class too."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Checks shared by the subcommands (before any work)
# ----------------------------------------------------------------------------------------------------------


def check_model_source(name: str, option: str = "MODEL") -> None:
    """A local folder, or something that can be a Hub id; a missing local path is named as such."""
    from .files import looks_like_hub_id

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{option} {name} is a file; give a model folder or a Hub id")
        return
    if not looks_like_hub_id(name):
        raise UsageError(f"{option} {name}: no such folder (and not a Hub id of the form namespace/name)")


def check_device(name: str | None) -> None:
    """Refuse a device torch does not know or that this machine does not have."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: unsupported device type {device.type!r}; use cpu, cuda or mps")


# ----------------------------------------------------------------------------------------------------------
# Subcommands
# ----------------------------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    require_extra("train")
    import tempfile

    from .files import check_output_folder

    if args.output:
        check_output_folder(Path(args.output), overwrite=args.overwrite)
    from .demo import DEMO_TRAINING, run_demo

    output = args.output or tempfile.mkdtemp(prefix="diffembed-demo-")
    if not args.output:  # mkdtemp makes it private; the user's umask decides, as for a folder they name
        from .files import current_umask

        os.chmod(output, 0o777 & ~current_umask())
    result = run_demo(output, max_steps=args.max_steps or DEMO_TRAINING["max_steps"], max_heldout=args.max_heldout,
                      overwrite=args.overwrite)
    print(f"Held-out retrieval: {result.heldout_rows} docstring summaries -> their functions' source, from standard "
          f"library modules not seen in training ({result.train_rows} training rows).")
    print(f"{'model':<24}{'nDCG@10':>9}{'MRR@10':>9}{'R@1':>7}{'R@10':>7}")
    for name, metrics in result.metrics.items():
        print(f"{name:<24}{metrics['ndcg@10']:>9.4f}{metrics['mrr@10']:>9.4f}{metrics['recall@1']:>7.3f}"
              f"{metrics['recall@10']:>7.3f}")
    print(f"fine-tuning: {result.steps} steps, loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}, "
          f"{result.train_seconds / 60:.1f} min on {os.cpu_count()} CPU cores")
    print(f"Hub-ready folder (reloaded with AutoModel and SentenceTransformer, trust_remote_code): {result.folder}")
    return 0


def _train(args: argparse.Namespace) -> int:
    require_extra("train")
    from .files import check_data_source, check_output_folder

    # the checks that need no heavy import first: a mistake is reported at once
    check_output_folder(Path(args.output), overwrite=args.overwrite)
    check_model_source(args.model)
    check_data_source(args.data)
    if args.eval_data:
        check_data_source(args.eval_data)
    check_device(args.device)
    from .data import ColumnMapping
    from .train import TrainingConfig, train

    overrides = {key: value for key, value in {
        "max_steps": args.max_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "max_seq_length": args.max_seq_length, "gradcache_mini_batch_size": args.gradcache,
        "lora": False if args.full else None, "adapter_only": args.adapter_only or None,
        "group_by_instruction": args.group_by_instruction or None, "eval_fraction": args.eval_fraction,
        "matryoshka_dims": args.matryoshka_dims, "truncate_dim": args.truncate_dim,
    }.items() if value is not None}
    config = TrainingConfig.from_file(args.config, **overrides) if args.config else TrainingConfig(**overrides)
    mapping = ColumnMapping(query=args.query_column, positive=args.positive_column,
                            negatives=args.negative_column or [], instruction=args.instruction_column)
    result = train(args.model, args.data, args.output, config, mapping=mapping, eval_data=args.eval_data,
                   overwrite=args.overwrite, resume=args.resume, device=args.device)
    if result.metrics_after:
        for name, metrics in (("before", result.metrics_before), ("after", result.metrics_after)):
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"{result.steps} training steps" + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
          + f"; model written to {result.output_dir}")
    return 0


def _is_folder_output(output: str) -> bool:
    """An output folder (corpus mode) ends in `/`, already exists as a folder, or has no file suffix."""
    return output.endswith(("/", os.sep)) or Path(output).is_dir() or not Path(output).suffix


def _encode_corpus(args: argparse.Namespace) -> int:
    """Corpus mode: shards + manifest in a folder, resumable; under torchrun every rank runs this."""
    from .corpus import CorpusError, encode_corpus

    rank = int(os.environ.get("RANK", "0"))
    if args.quantize:
        raise UsageError("--quantize applies to file output (.npy / .safetensors); corpus mode runs bf16 on CUDA")
    if args.ray and args.device:
        raise UsageError("--device does not apply with --ray: Ray places one actor per GPU (CPU where none)")
    check_model_source(args.model)
    check_device(args.device)
    from .compact import load_calibration

    options = dict(field=args.field or "text", id_field=args.id_field, title_field=args.title_field, split=args.split,
                   subset=args.subset, prompt_name=args.prompt_name, shard_size=args.shard_size, dtype=args.dtype,
                   max_tokens_per_batch=args.max_tokens_per_batch, max_seq_length=args.max_seq_length,
                   skip_bad_rows=args.skip_bad_rows, overwrite=args.overwrite, show_progress_bar=args.progress,
                   truncate_dim=args.truncate_dim, precision=args.precision,
                   calibration=load_calibration(args.calibration) if args.calibration else None,
                   calibration_rows=args.calibration_rows)
    try:  # the library checks the options before it touches a model or a file
        if args.input == "-":
            raise CorpusError("corpus mode (an output folder) reads a file, a folder or a Hub dataset: pass --input")
        if args.ray:
            from .corpus.ray_data import encode_corpus_with_ray

            result = encode_corpus_with_ray(args.model, args.input, args.output, address=args.ray, **options)
        else:
            result = encode_corpus(args.model, args.input, args.output, device=args.device, **options)
    except DiffembedError as err:
        if rank == 0:  # under torchrun every rank meets the same error: one of them says it
            raise
        return err.exit_status
    if rank == 0:
        kept = result.shards - len(result.computed)
        print(f"{result.rows} embeddings in {result.shards} shards ({len(result.computed)} computed now, {kept} kept "
              f"from before; {result.skipped_rows} bad rows skipped) -> {result.output_dir}/manifest.json",
              file=sys.stderr)
    return 0


def _encode(args: argparse.Namespace) -> int:
    if _is_folder_output(args.output):
        return _encode_corpus(args)
    corpus_only = [option for option, value in (("--id-field", args.id_field), ("--title-field", args.title_field),
                                                ("--split", args.split), ("--subset", args.subset),
                                                ("--ray", args.ray), ("--skip-bad-rows", args.skip_bad_rows),
                                                ("--calibration-rows", args.calibration_rows != 10_000)) if value]
    if corpus_only:
        raise UsageError(f"{', '.join(corpus_only)} apply to corpus mode only: give --output a folder (ending in /)")
    from .files import check_output_file
    from .text_input import read_texts

    output = Path(args.output)
    check_output_file(output, overwrite=args.overwrite, suffixes=(".npy", ".safetensors"))
    check_model_source(args.model)
    precision = args.precision or "float32"
    from .compact import check_precision, load_calibration

    check_precision(precision)
    calibration = load_calibration(args.calibration) if args.calibration else None
    texts = read_texts(args.input, args.field)
    check_device(args.device)

    from .encoding import embedding_width, encode, load_encoder, max_positions, save_embeddings

    model = load_encoder(args.model, device=args.device, quantize=args.quantize, truncate_dim=args.truncate_dim)
    if calibration is not None:  # the ranges must be this model's, at this dimension
        from .corpus.encode import model_identity

        calibration.check(model_identity(args.model, model), model.truncate_dim or embedding_width(model))
    if args.max_seq_length is not None:
        limit = max_positions(model)
        if limit and args.max_seq_length > limit:
            raise UsageError(f"--max-seq-length {args.max_seq_length} exceeds the model's "
                             f"max_position_embeddings ({limit})")
        model.max_seq_length = args.max_seq_length
    if args.prompt_name is not None and args.prompt_name not in model.prompts:
        raise UsageError(f"--prompt-name {args.prompt_name!r} is not one of the model's prompts: "
                         f"{', '.join(sorted(model.prompts)) or '(none)'}")
    embeddings = encode(model, texts, prompt_name=args.prompt_name, batch_size=args.batch_size,
                        show_progress_bar=args.progress, precision=precision, calibration=calibration)
    save_embeddings(embeddings, output)
    dim = model.truncate_dim or embedding_width(model)
    print(f"{len(texts)} embeddings of dimension {dim} ({precision}, {embeddings.dtype}, {embeddings.shape[1]} values "
          f"per row) -> {output}", file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    import signal

    if Path(args.output).exists() and not args.overwrite:  # at once, before the heavy imports
        raise UsageError(f"{Path(args.output).absolute()} already exists; pass --overwrite to replace it")
    from .convert import convert_checkpoint

    # SIGTERM (kill, a job scheduler) becomes SystemExit, so the half-built temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    output = convert_checkpoint(
        args.source, args.output, family=args.family, overwrite=args.overwrite,
        max_shard_size=args.max_shard_size, max_seq_length=args.max_seq_length, allow_pickle=args.allow_pickle,
        ignore_sliding_window=args.ignore_sliding_window, trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    )
    print(f"DiffEmbed folder: {output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import signal

    from .export import export_vllm

    # SIGTERM becomes SystemExit, so the half-built temporary folder is removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    output = export_vllm(args.model, args.output, overwrite=args.overwrite)
    print(f"vLLM folder: {output} (its README.md gives the serve command and the query prompt)")
    return 0


def _push(args: argparse.Namespace) -> int:
    from .publish import push

    result = push(
        args.folder, args.repo_id, token=args.token, private=True if args.private else None,
        revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message,
        dry_run=args.dry_run, merge_adapter=args.merge, base_model=args.base_model, license=args.license,
        language=args.language, card=args.card, write_card=args.write_card, overwrite_card=args.overwrite_card,
        validate=not args.skip_validation, eval_results=args.eval_results,
    )
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


def _evaluate(args: argparse.Namespace) -> int:
    if sum(x is not None for x in (args.suite, args.tasks, args.data)) != 1:
        raise UsageError("give exactly one of --suite NAME, --tasks T1,T2 or --data FOLDER")
    check_model_source(args.model)
    check_device(args.device)
    require_extra("eval")
    from datasets.utils.logging import disable_progress_bar

    from .evaluation.run import evaluate

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    from .compact import load_calibration

    calibration = load_calibration(args.calibration) if args.calibration else None
    disable_progress_bar()  # mteb's per-split data reshaping; the encoder shows the bar that matters
    result = evaluate(
        args.model, suite=args.suite, tasks=tasks, data=args.data,
        output=args.output, instructions=args.instructions, query_prompt=args.query_prompt,
        max_seq_length=args.max_seq_length, max_tokens_per_batch=args.max_tokens_per_batch,
        overwrite=args.overwrite, device=args.device, stdlib_rows=args.max_heldout,
        truncate_dim=args.truncate_dim, precision=args.precision, rescore=args.rescore, calibration=calibration,
        calibration_rows=args.calibration_rows,
    )
    print(result.table)
    print(f"results (mteb's files, summary.json, run.json): {result.output}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="diffembed", description="Diffusion language models as text embedders.")
    parser.add_argument("--version", action="version", version=f"diffembed-hf {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="fine-tune and evaluate the default model on a standard-library task")
    demo.add_argument("--output", help="a new (or empty) folder for the task, the models and the Hub-ready "
                      "checkpoint (default: a new temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="allow a non-empty --output; the demo's data/, "
                      "untrained/ and model/ in it are replaced")
    demo.add_argument("--max-steps", type=positive_int, default=400, help="training steps")
    demo.add_argument("--max-heldout", type=positive_int, default=300, help="held-out rows to evaluate on")
    demo.set_defaults(func=_demo)

    from_config = "(default: the recipe's {}, or --config's)"
    tr = commands.add_parser("train", help="contrastive fine-tuning with the DiffEmbed recipe (LoRA, InfoNCE x 50)")
    tr.add_argument("model", help="a DiffEmbed folder or Hub id")
    tr.add_argument("data", help="training rows: .jsonl / .csv / .parquet, or a Hub dataset id")
    tr.add_argument("output", help="folder to write the fine-tuned, Hub-ready model to (new or empty)")
    tr.add_argument("--config", help="JSON file of TrainingConfig fields; flags below override it (default: none)")
    tr.add_argument("--max-steps", type=positive_int, help="optimizer steps " + from_config.format(1000))
    tr.add_argument("--batch-size", type=positive_int, help="per device " + from_config.format(4))
    tr.add_argument("--learning-rate", type=positive_float, help=from_config.format("1e-4"))
    tr.add_argument("--max-seq-length", type=positive_int, help="tokens " + from_config.format(4096))
    tr.add_argument("--gradcache", type=positive_int, metavar="MINI_BATCH",
                    help="GradCache with this mini-batch size (default: off)")
    tr.add_argument("--matryoshka-dims", nargs="?", const="auto", metavar="D1,D2,...",
                    help="also train the leading dimensions (sentence-transformers' MatryoshkaLoss around the recipe's "
                    "loss, GradCache too), e.g. 3584,1024,512,256,128; bare: the width halved down to 64 "
                    "(default: off)")
    tr.add_argument("--truncate-dim", type=positive_int, metavar="D", help="store D as the model's default "
                    "truncate_dim (config_sentence_transformers.json; default: none, full vectors)")
    tr.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    tr.add_argument("--adapter-only", action="store_true", help="save only the LoRA adapter (not merged)")
    tr.add_argument("--group-by-instruction", action="store_true", help="one instruction per batch")
    tr.add_argument("--eval-data", help="held-out rows (default: --eval-fraction of the training rows)")
    tr.add_argument("--eval-fraction", type=fraction, help="share of the rows held out, 0 for none "
                    + from_config.format(0.1))
    tr.add_argument("--query-column", help="(default: user_query, query, anchor or question)")
    tr.add_argument("--positive-column", help="(default: positive_document, positive, pos or document)")
    tr.add_argument("--negative-column", action="append", help="repeat for several negative columns "
                    "(default: hard_negative_document, negative(s), neg, hard_negative(s), negative_N)")
    tr.add_argument("--instruction-column", help="(default: task, instruction or prompt, if present)")
    tr.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT once the new model is whole")
    tr.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint of an "
                    "interrupted run (from the start if there is none)")
    tr.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    tr.set_defaults(func=_train)

    enc = commands.add_parser("encode", help="embed texts from a file or stdin into a .npy or .safetensors file, or a "
                          "corpus into a folder of parquet shards (resumable; torchrun and Ray)")
    enc.add_argument("model", help="a DiffEmbed folder or Hub id")
    enc.add_argument("--input", "-i", default="-", help="text file (one text per line), JSON lines "
                     "(.jsonl / .ndjson / .jsonlines, or any input with --field), or - for stdin")
    enc.add_argument("--field", help="the text field of JSON-lines records (default: text)")
    enc.add_argument("--output", "-o", required=True, help="embeddings file (.npy or .safetensors), or a folder "
                     "(corpus mode: ends in /, is a folder, or has no suffix)")
    enc.add_argument("--overwrite", action="store_true", help="replace an existing --output file; in corpus mode, "
                     "replace output made with other settings (the same settings resume)")
    enc.add_argument("--prompt-name", help="a prompt stored with the model, e.g. query (default: none)")
    enc.add_argument("--batch-size", type=positive_int, default=32, help="texts per forward pass")
    enc.add_argument("--max-seq-length", type=positive_int,
                     help="override the model's maximum length in tokens (default: the model's)")
    enc.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    enc.add_argument("--progress", action=argparse.BooleanOptionalAction,
                     help="force the progress bar on/off (default: on from 256 texts)")
    # Corpus mode: --output is a folder (ends in /, exists as a folder, or has no suffix) and --input a .jsonl /
    # .parquet / .csv file, a folder of them or a Hub dataset ORG/NAME: parquet shards + manifest.json, resumable.
    enc.add_argument("--id-field", help="corpus mode: the id column (default: _id, else id, else the row number)")
    enc.add_argument("--title-field", help="corpus mode: a title column, joined to the text as mteb does "
                     "(default: none)")
    enc.add_argument("--split", help="corpus mode, Hub dataset: the split (default: its only split)")
    enc.add_argument("--subset", help="corpus mode, Hub dataset: the configuration name (default: the dataset's "
                     "default)")
    enc.add_argument("--shard-size", type=positive_int, default=10_000,
                     help="corpus mode: input rows per shard")
    enc.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                     help="corpus mode: stored embedding type")
    enc.add_argument("--max-tokens-per-batch", type=positive_int, default=16384,
                     help="corpus mode: real tokens per batch")
    enc.add_argument("--skip-bad-rows", action="store_true",
                     help="corpus mode: leave out rows without a string text (counted in the manifest)")
    enc.add_argument("--ray", metavar="ADDRESS", help="corpus mode: run on a Ray cluster (e.g. auto, or host:port; default: "
                     "no Ray, this process or torchrun)")
    enc.add_argument("--quantize", choices=["fp8"], help="FP8 linear layers (CUDA, compute capability >= 8.9; "
                     "pip install 'diffembed-hf[fp8]'; default: none)")
    # Compact vectors (compact.py): fewer dimensions, fewer bits per dimension
    enc.add_argument("--truncate-dim", type=positive_int, metavar="D", help="keep the first D dimensions, "
                     "renormalised (default: the model's stored truncate_dim, else all)")
    enc.add_argument("--precision", choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"],
                     help="stored values: int8/uint8 codes (calibration ranges), binary/ubinary packed bits "
                     "(np.packbits), via sentence-transformers' quantize_embeddings (default: float32, or --dtype)")
    enc.add_argument("--calibration", metavar="FILE", help="int8/uint8 ranges: a corpus output folder or its "
                     "manifest.json (how queries reuse their corpus's ranges), or a ranges JSON file (default: corpus "
                     "mode computes them from a sample; file mode requires them)")
    enc.add_argument("--calibration-rows", type=positive_int, default=10_000,
                     help="corpus mode, int8/uint8: rows in the calibration sample, spread evenly over the corpus")
    enc.set_defaults(func=_encode)

    conv = commands.add_parser("convert", help="convert a Dream / LLaDA / Qwen2 / Llama / Mistral checkpoint "
                               "into a Hub-ready DiffEmbed folder")
    conv.add_argument("source", help="a local checkpoint folder or a Hub id")
    conv.add_argument("output", help="the folder to create")
    conv.add_argument("--family", choices=["dream", "llada", "qwen2", "llama", "mistral"],
                      help="force the source family (default: from config.json's model_type)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUTPUT once the new folder is complete")
    conv.add_argument("--max-shard-size", type=byte_size, default="5GB", help="output shard size cap, e.g. 5GB or "
                      "500MiB")
    conv.add_argument("--max-seq-length", type=positive_int,
                      help="sentence-transformers truncation length (default: min(max positions, 4096))")
    conv.add_argument("--allow-pickle", action="store_true",
                      help="accept .bin weights, loaded with torch.load(weights_only=True)")
    conv.add_argument("--ignore-sliding-window", action="store_true",
                      help="convert a sliding-window source (e.g. Mistral v0.1) to full attention")
    conv.add_argument("--trust-remote-code", action="store_true", help="let a remote-code tokenizer run its code")
    conv.add_argument("--revision", help="Hub revision (branch, tag or commit) for a Hub id (default: main)")
    conv.set_defaults(func=_convert)

    export = commands.add_parser("export", help="write a DiffEmbed folder in the form an inference engine serves")
    engines = export.add_subparsers(dest="engine", required=True)
    vllm = engines.add_parser("vllm", help="a folder vLLM serves as an embedding model with no remote code "
                              "(stock Qwen2/Llama config, is_causal false, weights hard-linked)")
    vllm.add_argument("model", help="a DiffEmbed folder (diffembed convert / train)")
    vllm.add_argument("output", help="the folder to create")
    vllm.add_argument("--overwrite", action="store_true", help="replace OUTPUT once the new folder is complete")
    vllm.set_defaults(func=_export)

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
    pub.add_argument("--base-model", help="Hub id of the base model, needed for an adapter whose base is local (default: the adapter's base)")
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
    pub.set_defaults(func=_push)

    ev = commands.add_parser("evaluate", help="the study's benchmarks (mteb), named mteb tasks, or a local BEIR "
                             "folder; results beside the study's published numbers")
    ev.add_argument("model", help="a DiffEmbed folder or Hub id")
    ev.add_argument("--suite", help="bright, bright-all, longembed, followir, mteb15, or stdlib (offline) "
                    "(default: none; give one of --suite, --tasks, --data)")
    ev.add_argument("--tasks", help="comma-separated mteb task names (default: none)")
    ev.add_argument("--data", action="append", help="a BEIR-layout folder (corpus.jsonl, queries.jsonl, "
                    "qrels/test.tsv); repeat for several (default: none)")
    ev.add_argument("--output", required=True, help="results folder (e.g. MODEL/eval, which push puts on the card)")
    ev.add_argument("--instructions", help="JSON file of task name -> instruction, over the study's "
                    "(default: the study's instructions)")
    ev.add_argument("--query-prompt", help="text before each query of --data tasks (default: the model's query "
                    "prompt)")
    ev.add_argument("--max-seq-length", type=positive_int, help="default: the suite's protocol, else the model's own")
    ev.add_argument("--max-tokens-per-batch", type=positive_int, default=16384, help="real tokens per forward pass")
    ev.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    ev.add_argument("--max-heldout", type=positive_int, help="--suite stdlib: held-out rows, as `diffembed demo --max-heldout` "
                    "(default: 300)")
    ev.add_argument("--overwrite", action="store_true", help="recompute this model's results already in --output")
    ev.add_argument("--truncate-dim", type=positive_int, metavar="D", help="score the first D dimensions, "
                    "renormalised (default: the model's stored truncate_dim, else all)")
    ev.add_argument("--precision", choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"],
                    default="float32", help="score vectors stored at this precision; int8/uint8/binary/ubinary: "
                    "retrieval tasks, the corpus quantized, binary ranked by Hamming distance")
    ev.add_argument("--rescore", type=positive_int, metavar="K", help="binary/ubinary: rescore each query's top K "
                    "candidates with the float query (default: no rescoring)")
    ev.add_argument("--calibration", metavar="FILE", help="int8/uint8 ranges: a corpus output folder, its "
                    "manifest.json or a ranges JSON (default: computed from a sample of each task's corpus)")
    ev.add_argument("--calibration-rows", type=positive_int, default=10_000,
                    help="int8/uint8: corpus rows in the calibration sample")
    ev.set_defaults(func=_evaluate)

    for sub in commands.choices.values():  # every subcommand, including ones added above later, gets these
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="log progress of the libraries too (INFO)")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="print the traceback of an error")
    parser.set_defaults(verbose=False, debug=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress of the libraries too (INFO)")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error")
    return parser


class _LogFilter(logging.Filter):
    """This package's INFO messages (what a job is doing) and every library's warnings; libraries' INFO only
    with --verbose."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbose or record.levelno >= logging.WARNING or record.name.startswith("diffembed_hf")


def _configure_output(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    handler.addFilter(_LogFilter(verbose))
    handler._diffembed_cli = True
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_diffembed_cli", False)]:  # main() called again
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not verbose:
        # torchao (the [fp8] extra), which PEFT and transformers import whenever it is installed, logs at import
        # that kernels its CPU build lacks failed to load and that torch deprecated a registration it makes:
        # nothing a user can act on.
        for name in ("torchao", "torch.utils._pytree"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # transformers 5 renamed gradient checkpointing to activation checkpointing; sentence-transformers and
        # PEFT still call the old names, which we cannot change. The rest of our code uses the new names.
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*only defines `gradient_checkpointing_enable`",
                                category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_output(args.verbose)
    command = f"diffembed {args.command}"
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except DiffembedError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{command}: error: {err}", file=sys.stderr)
        return err.exit_status
    except Exception as err:  # noqa: BLE001 - a failure we did not foresee: still one line, traceback on request
        if args.debug:
            traceback.print_exc()
        print(f"{command}: error: {type(err).__name__}: {err}" + ("" if args.debug else
              " (run again with --debug for the traceback)"), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
