"""`diffembed reasonaug CONCEPTS OUT --base-url URL --model NAME`: reasoning-retrieval training data for your own
concepts through any OpenAI-compatible chat server (see `diffembed_hf.reasonaug`)."""

from __future__ import annotations

import argparse
import sys

from ..errors import require_extra
from .common import fraction, non_negative_int, positive_float, positive_int


def add_parser(commands) -> argparse.ArgumentParser:
    """Register `diffembed reasonaug` and its options on the CLI's subcommands."""
    def temperature(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in [0, 2], got {text!r}") from None
        if not 0 <= value <= 2:
            raise argparse.ArgumentTypeError(f"must be a number in [0, 2], got {text!r}")
        return value

    parser = commands.add_parser(
        "reasonaug", help="generate reasoning-retrieval training data (ReasonAug) for your own concepts through any "
        "OpenAI-compatible chat server, resumably")
    parser.add_argument("concepts", metavar="CONCEPTS", help="a .yaml / .json file: domains -> question_type, "
                        "concepts, optional topics and references (see examples/reasonaug_concepts.yaml)")
    parser.add_argument("output", metavar="OUT", help="the run folder: journal.jsonl, then train.jsonl, corpus.jsonl, "
                        "heldout/, dropped.jsonl, run.json; rerun the same command on it to resume")
    parser.add_argument("--model", required=True, help="the model name the server serves (e.g. gpt-4o-mini, or the "
                        "name given to vllm serve)")
    parser.add_argument("--base-url", help="the server's OpenAI API root, e.g. http://127.0.0.1:8000/v1 "
                        "(default: OPENAI_BASE_URL, else the hosted OpenAI API with OPENAI_API_KEY)")
    parser.add_argument("--problems-per-concept", type=positive_int, default=8, help="problem requests per concept")
    parser.add_argument("--workers", type=positive_int, default=8, help="requests in flight at once")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="fixes sampling seeds, topics, held-out "
                        "concepts, negatives and row choices (default: 0)")
    parser.add_argument("--prompts", help="a .yaml / .json file over the default prompts, key by key (default: the "
                        "package's prompts.yaml)")
    parser.add_argument("--temperature", type=temperature, default=1.0, help="sampling temperature of definitions "
                        "and problems (the checker samples at 0)")
    parser.add_argument("--max-tokens", type=positive_int, default=4000, help="max_completion_tokens per answer")
    parser.add_argument("--answer-retries", type=non_negative_int, default=1, help="times an unusable answer (empty, "
                        "refused, cut off, without its sections) is asked again with a new seed before it is dropped")
    parser.add_argument("--heldout-fraction", type=fraction, default=0.1, help="share of each domain's concepts held "
                        "out of train.jsonl for the heldout/ BEIR folder")
    parser.add_argument("--timeout", type=positive_float, default=300.0, help="seconds to wait for one answer")
    parser.add_argument("--max-retries", type=non_negative_int, default=5, help="retries of a request after HTTP "
                        "429 / 5xx, a timeout, a failed connection or a body that is not a chat completion")
    parser.add_argument("--batch-file", help="write the pending requests as an OpenAI Batch API input file instead of "
                        "sending them, then stop (default: send them)")
    parser.add_argument("--from-batch-output", help="a Batch API output file: journal its answers first, then go on "
                        "(default: none)")
    parser.add_argument("--overwrite", action="store_true", help="use an OUT made with other settings (its journaled "
                        "answers to identical requests are reused) and replace an existing --batch-file")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        help="force the progress bar on/off (default: on when stderr is a terminal)")
    parser.set_defaults(func=run)
    return parser


def _counts(counts: dict) -> str:
    return ", ".join(f"{name} {value}" for name, value in counts.items()) or "none"


def reasonaug_options(args: argparse.Namespace):
    """The `ReasonAugOptions` of the command line."""
    from ..reasonaug.pipeline import ReasonAugOptions

    return ReasonAugOptions(
        model=args.model, base_url=args.base_url, prompts=args.prompts, problems_per_concept=args.problems_per_concept,
        seed=args.seed, temperature=args.temperature, max_tokens=args.max_tokens, answer_retries=args.answer_retries,
        heldout_fraction=args.heldout_fraction, workers=args.workers, timeout=args.timeout,
        max_retries=args.max_retries, batch_file=args.batch_file, from_batch_output=args.from_batch_output,
        overwrite=args.overwrite, show_progress=args.progress)


def run(args: argparse.Namespace) -> int:
    require_extra("reasonaug")
    from ..reasonaug.answers import FAILURES
    from ..reasonaug.client import TRANSIENT
    from ..reasonaug.pipeline import generate_reasonaug

    result = generate_reasonaug(args.concepts, args.output, reasonaug_options(args))
    traffic = result.traffic
    if args.from_batch_output:
        print(f"batch output: {traffic['batch_lines_journaled']} answers journaled, failed lines: "
              f"{_counts(traffic['batch_lines_failed'])}, answers to no pending request: "
              f"{traffic['batch_lines_unknown']}", file=sys.stderr)
    if result.status == "batch":
        print(f"{result.pending} requests written to {result.batch_file} (Batch API input; {traffic['replayed']} "
              f"answers already in the journal). Run the batch, then: diffembed reasonaug {args.concepts} "
              f"{args.output} --model {args.model} --from-batch-output RESULTS.jsonl [--batch-file NEXT.jsonl]",
              file=sys.stderr)
        return 0
    s = result.summary
    requests = s["requests"]
    print(f"ReasonAug: {s['concepts']} concepts in {s['domains']} domains ({len(s['heldout_concepts'])} held out) -> "
          f"{result.output}", file=sys.stderr)
    print(f"requests: {requests['answered']} answered ({_counts(requests['by_stage'])}), "
          f"{requests['prompt_tokens']:,} prompt + {requests['completion_tokens']:,} completion tokens; this run sent "
          f"{traffic['sent']}, replayed {traffic['replayed']} from the journal", file=sys.stderr)
    if traffic["retried"] or traffic["failed"]:
        print("retried: " + _counts({TRANSIENT[k]: v for k, v in traffic["retried"].items()}), file=sys.stderr)
    for stage, counts in s["unusable_answers"].items():
        dropped = s["dropped"].get(stage, {})
        print(f"unusable {stage} answers: " + ", ".join(
            f"{FAILURES[reason]} {n} ({dropped.get(reason, 0)} dropped)" for reason, n in counts.items()),
            file=sys.stderr)
    if "duplicate" in s["dropped"].get("problem", {}):
        print(f"duplicate problems dropped: {s['dropped']['problem']['duplicate']}", file=sys.stderr)
    problems = s["problems"]
    rows = dict(s["rows"])
    total = rows.pop("total")
    print(f"problems: {problems['asked']} asked, {problems['checked']} passed the checker, {problems['kept']} kept; "
          f"definitions: {s['definitions']} of {s['concepts']}", file=sys.stderr)
    print(f"train.jsonl: {total} rows ({_counts(rows)}; rows without a hard negative left out: "
          f"{_counts(s['rows_without_negative'])}); corpus.jsonl: {s['definitions']} definitions; heldout/: "
          f"{s['heldout']['queries']} queries over {s['heldout']['documents']} definitions", file=sys.stderr)
    return 0
