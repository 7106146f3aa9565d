"""`diffembed demo`: the built-in default, end to end and offline (see `diffembed_hf.demo`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import require_extra
from .common import positive_int


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="fine-tune and evaluate the default model on a standard-library task")
    demo.add_argument("--output", help="a new (or empty) folder for the task, the models and the Hub-ready "
                      "checkpoint (default: a new temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="allow a non-empty --output; the demo's data/, "
                      "untrained/ and model/ in it are replaced")
    demo.add_argument("--max-steps", type=positive_int, default=400, help="training steps")
    demo.add_argument("--max-heldout", type=positive_int, default=300, help="held-out rows to evaluate on")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_extra("train")
    import tempfile

    from ..files import check_output_folder, current_umask

    if args.output:
        check_output_folder(Path(args.output), overwrite=args.overwrite)
    from ..demo import DEMO_TRAINING, run_demo

    output = args.output or tempfile.mkdtemp(prefix="diffembed-demo-")
    if not args.output:  # mkdtemp makes it private; the user's umask decides, as for a folder they name
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
