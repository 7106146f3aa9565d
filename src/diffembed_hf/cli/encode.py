"""`diffembed encode`: texts from a file or stdin into one `.npy` / `.safetensors` file (file mode), or a corpus
into a folder of parquet shards (corpus mode: resumable, torchrun, Ray). Both run the same packed encoder; the
library decides the mode from `--output` (`encoding.is_folder_output`) and refuses options the mode would not
use (`encoding.check_mode_options`)."""

from __future__ import annotations

import argparse
import sys
import traceback

from ..errors import DiffembedError, UsageError
from .common import (add_estimate_options, add_trust_option, check_device, check_model_source, positive_int,
                     print_inference_estimate)


def add_parser(commands) -> None:
    enc = commands.add_parser("encode", help="embed texts from a file or stdin into a .npy or .safetensors file, or a "
                              "corpus into a folder of parquet shards (resumable; torchrun and Ray)")
    enc.add_argument("model", help="a DiffEmbed folder or Hub id")
    enc.add_argument("--input", "-i", default="-", help="text file (one text per line), JSON lines "
                     "(.jsonl / .ndjson / .jsonlines, or any text input with --field), .csv or .parquet (any may be "
                     ".gz / .bz2 / .xz but parquet), or - for stdin; corpus mode: such a file, a folder of them, or "
                     "a Hub dataset ORG/NAME")
    enc.add_argument("--field", help="the text field of JSON-lines, CSV or parquet rows (default: text)")
    enc.add_argument("--output", "-o", required=True, help="embeddings file (.npy or .safetensors), or a folder "
                     "(corpus mode: ends in /, is a folder, or has no suffix)")
    enc.add_argument("--overwrite", action="store_true", help="replace an existing --output file; in corpus mode, "
                     "replace output made with other settings (the same settings resume)")
    enc.add_argument("--prompt-name", help="a prompt stored with the model, e.g. query (default: none)")
    enc.add_argument("--max-tokens-per-batch", type=positive_int, default=16384,
                     help="real tokens per forward pass (length-sorted, no padding)")
    enc.add_argument("--max-seq-length", type=positive_int,
                     help="override the model's maximum length in tokens (default: the model's)")
    enc.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored embedding type "
                     "(float vectors; --precision also takes the compact ones)")
    compact = enc.add_argument_group("compact vectors")
    compact.add_argument("--truncate-dim", type=positive_int, metavar="D", help="keep the first D dimensions, "
                         "renormalised (default: the model's stored truncate_dim, else all)")
    compact.add_argument("--precision", choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"],
                         help="stored values: int8/uint8 codes (calibration ranges), binary/ubinary packed bits "
                         "(np.packbits, dim / 8 bytes) (default: --dtype)")
    compact.add_argument("--calibration", metavar="FILE", help="int8/uint8 ranges of this model: a corpus output "
                         "folder encoded at that precision, its manifest, or a ranges file (file mode: required; "
                         "corpus mode: default, ranges computed from a sample of the corpus)")
    enc.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    enc.add_argument("--quantize", choices=["fp8"], help="FP8 linear layers (CUDA, compute capability >= 8.9; "
                     "pip install 'diffembed-hf[fp8]'; default: none)")
    enc.add_argument("--compile", action="store_true", help="compile the model's forward with torch.compile (one "
                     "graph, dynamic shapes): the first batch pays the compilation, later ones run faster")
    enc.add_argument("--progress", action=argparse.BooleanOptionalAction,
                     help="force the progress bar on/off (default: on from 256 texts)")
    add_trust_option(enc)
    add_estimate_options(enc, "encoding")
    corpus = enc.add_argument_group("corpus mode (--output is a folder)")
    corpus.add_argument("--id-field", help="the id column (default: _id, else id, else the row number)")
    corpus.add_argument("--title-field", help="a title column, joined to the text as mteb does (default: none)")
    corpus.add_argument("--split", help="Hub dataset: the split (default: its only split)")
    corpus.add_argument("--subset", help="Hub dataset: the configuration name (default: the dataset's default)")
    corpus.add_argument("--shard-size", type=positive_int, help="input rows per shard (default: 10000)")
    corpus.add_argument("--skip-bad-rows", action="store_true",
                        help="leave out rows without a string text (counted in the manifest)")
    corpus.add_argument("--calibration-rows", type=positive_int, help="int8/uint8: rows in the calibration sample, "
                        "spread evenly over the corpus (default: 10000)")
    corpus.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster (e.g. auto, or host:port; default: "
                        "no Ray, this process or torchrun)")
    enc.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.estimate:  # config.json only: a folder whose weights are absent or damaged still estimates
        check_device(args.device)
        return print_inference_estimate(args, "encoding")
    check_model_source(args.model)  # before the heavy imports: a missing or damaged folder is named at once
    from ..encoding import check_mode_options, is_folder_output

    check_mode_options(args.output, vars(args))
    check_device(args.device)
    from ..compact import load_calibration

    calibration = load_calibration(args.calibration) if args.calibration else None
    if is_folder_output(args.output):
        return _corpus(args, calibration)
    from ..torchrun import torchrun_ranks
    from ..encoding import encode_file

    if torchrun_ranks().world_size > 1:  # every rank would embed every text into the same file
        raise UsageError("file mode (a .npy or .safetensors --output) runs in one process; under torchrun give "
                         "--output a folder (corpus mode), whose shards the ranks share")

    output, shape = encode_file(args.model, args.input, args.output, encode_options(args, calibration))
    precision = args.precision or args.dtype
    print(f"{shape[0]} embeddings ({precision}, {shape[1]} values per row) -> {output}", file=sys.stderr)
    return 0


def encode_options(args: argparse.Namespace, calibration=None):
    """File mode's `EncodeOptions` from the command line."""
    from ..encoding import EncodeOptions

    return EncodeOptions(**_shared(args, calibration), field=args.field)


def corpus_options(args: argparse.Namespace, calibration=None):
    """Corpus mode's `CorpusOptions` from the command line (an option not given keeps the library's default)."""
    from ..corpus import CorpusOptions

    given = {name: getattr(args, name) for name in ("field", "shard_size", "calibration_rows")
             if getattr(args, name) is not None}
    return CorpusOptions(**_shared(args, calibration), **given, id_field=args.id_field, title_field=args.title_field,
                         split=args.split, subset=args.subset, skip_bad_rows=args.skip_bad_rows, ray=args.ray)


def _shared(args: argparse.Namespace, calibration) -> dict:
    return dict(prompt_name=args.prompt_name, max_seq_length=args.max_seq_length,
                max_tokens_per_batch=args.max_tokens_per_batch, dtype=args.dtype, precision=args.precision,
                truncate_dim=args.truncate_dim, calibration=calibration, device=args.device, quantize=args.quantize,
                compile=args.compile, overwrite=args.overwrite, show_progress_bar=args.progress,
                trust_remote_code=args.trust_remote_code)


def _corpus(args: argparse.Namespace, calibration) -> int:
    """Corpus mode: shards + manifest in a folder, resumable; under torchrun every rank runs this."""
    from ..corpus import encode_corpus
    from ..torchrun import torchrun_ranks

    rank = torchrun_ranks().rank  # a stray RANK or WORLD_SIZE is refused here, naming it
    try:  # the library checks the options before it touches a model or a file
        result = encode_corpus(args.model, args.input, args.output, corpus_options(args, calibration))
    except DiffembedError as err:
        if rank == 0:  # under torchrun a failure on any rank is reported once, by rank 0
            raise
        if args.debug:
            traceback.print_exc()
        return err.exit_status
    if rank == 0:
        kept = result.shards - len(result.computed)
        print(f"{result.rows} embeddings in {result.shards} shards ({len(result.computed)} computed now, {kept} kept "
              f"from before; {result.skipped_rows} bad rows skipped) -> {result.output_dir}", file=sys.stderr)
    return 0
