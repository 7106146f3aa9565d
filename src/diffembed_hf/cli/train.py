"""`diffembed train`: contrastive fine-tuning with the DiffEmbed recipe (see `diffembed_hf.train`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import require_extra
from .common import (add_estimate_options, add_trust_option, check_device, check_model_source, fraction,
                     non_negative_int, positive_float, positive_int)

FROM_CONFIG = "(default: the recipe's {}, or --config's)"


def add_parser(commands) -> None:
    tr = commands.add_parser("train", help="contrastive fine-tuning with the DiffEmbed recipe (LoRA, InfoNCE x 50)")
    tr.add_argument("model", help="a DiffEmbed folder or Hub id")
    tr.add_argument("data", help="training rows: .jsonl / .csv / .parquet, or a Hub dataset id")
    tr.add_argument("output", help="folder to write the fine-tuned, Hub-ready model to (new or empty)")
    tr.add_argument("--config", help="JSON file of TrainingConfig fields; flags below override it (default: none)")
    tr.add_argument("--max-steps", type=positive_int, help="optimizer steps " + FROM_CONFIG.format(1000))
    tr.add_argument("--batch-size", type=positive_int, help="per device " + FROM_CONFIG.format(4))
    tr.add_argument("--learning-rate", type=positive_float, help=FROM_CONFIG.format("1e-4"))
    tr.add_argument("--lr-scheduler", choices=("linear", "cosine", "constant"),
                    help="the learning rate after warm-up " + FROM_CONFIG.format("linear decay"))
    tr.add_argument("--max-seq-length", type=positive_int, help="tokens training cuts inputs at (default: the "
                    "recipe's 4096 on CUDA, the training texts' own length on a CPU, or --config's)")
    tr.add_argument("--saved-max-seq-length", type=positive_int, help="the saved model's max_seq_length (default: "
                    "the base model's)")
    tr.add_argument("--warmup-steps", type=non_negative_int, help="learning-rate warm-up steps (default: the "
                    "recipe's 100, at most a tenth of --max-steps and ending before its last step, or --config's)")
    tr.add_argument("--warmup-ratio", type=fraction, help="warm-up as a share of --max-steps, instead of "
                    "--warmup-steps (default: none)")
    tr.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                    help="recompute activations to save memory (default: on CUDA; off on a CPU unless memory is short)")
    tr.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                    help="bf16 mixed precision (default: on CUDA, off on a CPU)")
    tr.add_argument("--gradcache", type=positive_int, metavar="MINI_BATCH",
                    help="GradCache with this mini-batch size (default: off)")
    tr.add_argument("--matryoshka-dims", nargs="?", const="auto", metavar="D1,D2,...",
                    help="also train the leading dimensions (sentence-transformers' MatryoshkaLoss around the recipe's "
                    "loss, GradCache too), e.g. 3584,1024,512,256,128; bare: the width halved down to 64 "
                    "(default: off)")
    tr.add_argument("--truncate-dim", type=positive_int, metavar="D", help="store D as the model's default "
                    "truncate_dim (config_sentence_transformers.json; default: none, full vectors)")
    tr.add_argument("--full", action="store_true", help="train all weights instead of LoRA")
    tr.add_argument("--lora-layers", type=positive_int, metavar="N", help="LoRA on the last N layers only: the "
                    "backward pass stops there, a step costs less (default: every layer)")
    tr.add_argument("--adapter-only", action="store_true", help="save only the LoRA adapter (not merged)")
    tr.add_argument("--group-by-instruction", action="store_true", help="one instruction per batch")
    tr.add_argument("--eval-data", help="held-out rows (default: --eval-fraction of the training rows)")
    tr.add_argument("--eval-fraction", type=fraction, help="share of the rows held out, 0 for none "
                    + FROM_CONFIG.format(0.1))
    tr.add_argument("--query-column", help="(default: user_query, query, anchor or question)")
    tr.add_argument("--positive-column", help="(default: positive_document, positive, pos or document)")
    tr.add_argument("--negative-column", action="append", help="repeat for several negative columns "
                    "(default: hard_negative_document, negative(s), neg, hard_negative(s), negative_N)")
    tr.add_argument("--instruction-column", help="(default: task, instruction or prompt, if present)")
    tr.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT once the new model is whole")
    tr.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint of an "
                    "interrupted run (from the start if there is none)")
    tr.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_trust_option(tr, "the base model folder")
    add_estimate_options(tr, "training")
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_extra("train")
    from ..outputs import check_output_folder

    # the checks that need no heavy import first: a mistake is reported at once
    if not args.estimate:  # the estimate writes nothing and reads config.json only
        check_output_folder(Path(args.output), overwrite=args.overwrite)
        check_model_source(args.model)
    from ..training_data import ColumnMapping, check_data_source

    check_data_source(args.data)
    if args.eval_data:
        check_data_source(args.eval_data)
    check_device(args.device)
    from ..train import TrainingConfig, train

    overrides = {key: value for key, value in {
        "max_steps": args.max_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "lr_scheduler": args.lr_scheduler, "lora_layers": args.lora_layers,
        "max_seq_length": args.max_seq_length, "gradcache_mini_batch_size": args.gradcache,
        "lora": False if args.full else None, "adapter_only": args.adapter_only or None,
        "group_by_instruction": args.group_by_instruction or None, "eval_fraction": args.eval_fraction,
        "warmup_steps": args.warmup_steps, "warmup_ratio": args.warmup_ratio,
        "saved_max_seq_length": args.saved_max_seq_length, "gradient_checkpointing": args.gradient_checkpointing,
        "bf16": args.bf16, "matryoshka_dims": args.matryoshka_dims, "truncate_dim": args.truncate_dim,
    }.items() if value is not None}
    config = TrainingConfig.from_file(args.config, **overrides) if args.config else TrainingConfig(**overrides)
    mapping = ColumnMapping(query=args.query_column, positive=args.positive_column,
                            negatives=args.negative_column or [], instruction=args.instruction_column)
    if args.estimate:
        return _estimate(args, config, mapping)
    result = train(args.model, args.data, args.output, config, mapping=mapping, eval_data=args.eval_data,
                   overwrite=args.overwrite, resume=args.resume, device=args.device,
                   trust_remote_code=args.trust_remote_code, device_memory=args.device_memory)
    if result.metrics_after:
        for name, metrics in (("before", result.metrics_before), ("after", result.metrics_after)):
            print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    print(f"{result.steps} training steps" + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
          + f"; model written to {result.output_dir}")
    return 0


def _estimate(args: argparse.Namespace, config, mapping) -> int:
    """`train --estimate`: the peak of a step from config.json and the rows' columns (texts per row)."""
    from ..torchrun import torchrun_ranks
    from ..training_data import load_training_data
    from ..train import texts_per_row, training_memory

    data_split = load_training_data(args.data, mapping=mapping, group_by_instruction=config.group_by_instruction,
                                    default_prompt=config.query_prompt, seed=config.seed)
    estimate, memory, source = training_memory(args.model, config, texts_per_row(data_split), args.device,
                                               torchrun_ranks().world_size, args.device_memory)
    print(estimate.table(memory, source))
    return 0
