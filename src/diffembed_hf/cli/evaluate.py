"""`diffembed evaluate`: the study's benchmarks (mteb), named mteb tasks or local BEIR folders (see
`diffembed_hf.evaluation`)."""

from __future__ import annotations

import argparse

from ..errors import require_extra
from .common import (add_estimate_options, add_trust_option, check_device, check_model_source, positive_int,
                     print_inference_estimate)


def add_parser(commands) -> None:
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
    ev.add_argument("--query-prompt", help="--data only: the instruction before each query of the local tasks, sent "
                    "as 'INSTRUCTION:\\n' as in training (default: the model's query prompt; suite and mteb tasks "
                    "take --instructions)")
    ev.add_argument("--max-seq-length", type=positive_int, help="default: the suite's protocol, else the model's own")
    ev.add_argument("--max-tokens-per-batch", type=positive_int, default=16384, help="real tokens per forward pass")
    ev.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    ev.add_argument("--compile", action="store_true", help="compile the model's forward with torch.compile (one "
                    "graph, dynamic shapes): the first batch pays the compilation, later ones run faster")
    ev.add_argument("--max-heldout", type=positive_int, help="--suite stdlib only: held-out rows, as `diffembed demo "
                    "--max-heldout` (default: 300)")
    ev.add_argument("--overwrite", action="store_true", help="recompute this model's results already in --output; "
                    "replace another model's (without it, a run into another model's results is refused)")
    add_trust_option(ev)
    add_estimate_options(ev, "evaluation")
    compact = ev.add_argument_group("compact vectors (each setting a result of its own beside the float one)")
    compact.add_argument("--truncate-dim", type=positive_int, metavar="D", help="score the first D dimensions, "
                         "renormalised (default: the model's stored truncate_dim, else all)")
    compact.add_argument("--precision", choices=["float32", "float16", "int8", "uint8", "binary", "ubinary"],
                         default="float32", help="score vectors stored at this precision; int8/uint8/binary/ubinary: "
                         "retrieval tasks, the corpus quantized, binary ranked by Hamming distance")
    compact.add_argument("--rescore", type=positive_int, metavar="K", help="binary/ubinary: rescore each query's top "
                         "K candidates with the float query (default: no rescoring)")
    compact.add_argument("--calibration", metavar="FILE", help="int8/uint8 ranges of this model: a corpus output "
                         "folder, its manifest or a ranges JSON (default: computed from a sample of each task's "
                         "corpus)")
    compact.add_argument("--calibration-rows", type=positive_int, default=10_000,
                         help="int8/uint8: corpus rows in the calibration sample")
    ev.set_defaults(func=run)


def evaluate_options(args: argparse.Namespace):
    """The `EvaluateOptions` of the command line."""
    from ..evaluation.run import EvaluateOptions

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()] if args.tasks else None
    return EvaluateOptions(
        suite=args.suite, tasks=tasks, data=args.data, instructions=args.instructions, query_prompt=args.query_prompt,
        max_seq_length=args.max_seq_length, max_tokens_per_batch=args.max_tokens_per_batch,
        stdlib_rows=args.max_heldout, truncate_dim=args.truncate_dim, precision=args.precision,
        rescore=args.rescore, calibration=args.calibration, calibration_rows=args.calibration_rows,
        device=args.device, compile=args.compile, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)


def run(args: argparse.Namespace) -> int:
    if args.estimate:  # config.json only; mteb's task data and the corpus vectors are not counted
        check_device(args.device)
        return print_inference_estimate(args, "evaluation")
    check_model_source(args.model)
    check_device(args.device)
    require_extra("eval", what="evaluation")
    from datasets.utils.logging import disable_progress_bar

    from ..evaluation.run import evaluate

    disable_progress_bar()  # mteb's per-split data reshaping; the encoder shows the bar that matters
    result = evaluate(args.model, evaluate_options(args), output=args.output)
    print(result.table)
    print(f"results (mteb's files, summary.json, run.json): {result.output}")
    return 0
