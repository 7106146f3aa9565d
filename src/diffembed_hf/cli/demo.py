"""`diffembed demo`: the built-in default, end to end and offline (see `diffembed_hf.demo`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import UsageError, require_extra
from .common import positive_int


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="fine-tune and evaluate the default model on a standard-library task")
    demo.add_argument("--output", help="a new (or empty) folder for the task, the models and the Hub-ready "
                      "checkpoint (default: a new temporary folder)")
    demo.add_argument("--overwrite", action="store_true", help="allow a non-empty --output; the demo's data/, "
                      "untrained/ and model/ in it are replaced")
    demo.add_argument("--max-steps", type=positive_int, help="training steps (default: 400; 60 with --base)")
    demo.add_argument("--base", metavar="PATH", help="run the demo from a real pretrained model instead of the small "
                      "random one: a GGUF file (MODEL.gguf, or a folder holding one; [gguf] extra), a checkpoint "
                      "folder to convert, or a DiffEmbed folder (default: the small random model, about 2 minutes)")
    demo.add_argument("--max-heldout", type=positive_int, default=300, help="held-out rows to evaluate on")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_extra("train")
    import tempfile

    from ..files import check_output_folder, current_umask

    if args.output:
        check_output_folder(Path(args.output), overwrite=args.overwrite)
    if args.base and not Path(args.base).expanduser().exists():
        raise UsageError(f"--base {args.base}: no such file or folder (give a MODEL.gguf file, a folder holding one, "
                         "a checkpoint folder or a DiffEmbed folder)")
    from ..demo import run_demo

    output = args.output or tempfile.mkdtemp(prefix="diffembed-demo-")
    if not args.output:  # mkdtemp makes it private; the user's umask decides, as for a folder they name
        os.chmod(output, 0o777 & ~current_umask())
    result = run_demo(output, max_steps=args.max_steps, max_heldout=args.max_heldout, overwrite=args.overwrite,
                      base=args.base)
    if args.base:
        print(f"Base model: {args.base} (converted to {result.folder.parent / 'untrained'} unless already DiffEmbed)")
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
