"""CPU training throughput on a real model: DiffEmbed against transformers + PEFT + sentence-transformers, trained
the same way, in the same run.

The model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576; benchmarks/real_model.py), the
data the demo's standard-library training rows (real text: docstring summaries with the task's instruction, the
functions' code as positives and hard negatives). Both variants train through this project's trainer
(`diffembed_hf.train.build_trainer`: sentence-transformers' trainer, PEFT LoRA r16 on q/k/v/o/gate/up/down, InfoNCE
x 50 with in-batch and one hard negative), with the settings `train` chooses on a CPU (no gradient checkpointing,
fp32, inputs cut at --max-seq-length, the process's cores as threads). The only difference is the backbone:
  * DiffEmbed  - the `diffembed convert` folder: packed tokens (no padding), SDPA per text on a CPU;
  * baseline   - what a transformers user builds from the same GGUF file: `LlamaModel` (transformers' GGUF loading,
                 the same dequantized weights) made bidirectional (`is_causal=False`, padded SDPA), which
                 sentence-transformers wraps with mean pooling and normalisation.
Same rows in the same order (the trainer's seeded sampler), same tokenization and truncation (the baseline folder
drops the chat template, see `baseline_folder`), same seeded LoRA, same loss: the script checks that both variants
saw the same first batch (its real token ids) and stops unless their fp32 first losses agree within
LOSS_TOLERANCE, before it reports any timing. `--dtypes fp32,bf16` also runs both with the frozen base held in bf16
(LoRA adapters, AdamW and DiffEmbed's pooling in fp32): the ratio is printed against the baseline in fp32 (its
default) and in the same dtype.

Each variant runs in its own process, the two alternate for --rounds rounds (a busy spell on a shared machine hits
both), and tokens/s is the median over the timed steps of every round: real tokens (from the attention masks) per
second of optimizer step.

    python benchmarks/train_throughput_cpu.py --rounds 2 --dtypes fp32    # 2 x 2 processes x 5 steps
    python benchmarks/train_throughput_cpu.py --smoke    # smoke test of the script: a tiny GGUF, 1 round of 1 step

--smoke runs both variants in both dtypes (4 processes, one round, one warm-up and one timed step of 4 rows at 32
tokens, on 32 of the training rows) from the tiny GGUF file of SmolLM2's architecture (real_model.py --smoke); the
same-batch and same-loss checks still stop the run. No figure is a measurement.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import converted_smollm2, model_gguf  # noqa: E402


def baseline_folder(root: Path, smoke: bool = False) -> Path:
    """The GGUF file as a plain transformers checkpoint (what `from_pretrained(..., gguf_file=...)` gives a user),
    without its chat template: sentence-transformers 6 renders every text of a tokenizer that has one through it
    (SmolLM2's system prompt and role markers around each text: 1,942 instead of 1,441 real tokens per step, and a
    different first loss), which the DiffEmbed folder does not; without it both tokenize to the same ids."""
    from diffembed_hf.convert.gguf import dequantize_to_checkpoint, read_gguf_info

    folder = root / "transformers"
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        dequantize_to_checkpoint(read_gguf_info(model_gguf(folder, smoke)), folder, "float32")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


def is_bidirectional(model, tokenizer) -> bool:
    """A later token changes the first token's state only under bidirectional attention."""
    ids = tokenizer(["one two three four", "one two three five"], return_tensors="pt")
    with torch.no_grad():
        states = model(**ids).last_hidden_state
    return not torch.allclose(states[0, 0], states[1, 0])


def run_variant(args) -> dict:
    from sentence_transformers import SentenceTransformer
    from transformers import TrainerCallback

    from diffembed_hf.training_data import load_training_data
    from diffembed_hf.device_settings import available_cores
    from diffembed_hf.train import TrainingConfig, backbone, build_trainer

    torch.set_num_threads(available_cores())
    if args.worker == "diffembed":
        st = SentenceTransformer(args.folder, device="cpu", trust_remote_code=True)
    else:
        st = SentenceTransformer(args.folder, device="cpu",
                                 model_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})
        backbone(st).config.is_causal = False  # bidirectional (transformers >= 5.2)
    st.max_seq_length = args.max_seq_length
    if args.bf16:  # the frozen base in bf16; PEFT keeps the LoRA adapters (and so AdamW) in fp32
        backbone(st).to(torch.bfloat16)
    bidirectional = is_bidirectional(backbone(st), st.tokenizer)
    data = load_training_data(args.data).train
    config = TrainingConfig(max_steps=args.warmup + args.steps, batch_size=args.batch_size, warmup_steps=0,
                            learning_rate=1e-4, save_steps=10**9, logging_steps=1, max_seq_length=args.max_seq_length,
                            eval_fraction=0.0, gradient_checkpointing=False, bf16=False)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    step_tokens, first_ids = [], []

    def count(module, inputs):
        masks = [feature["attention_mask"] for feature in inputs[0]]
        step_tokens.append((sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)))
        if not first_ids:  # the first batch's real token ids, to show both variants saw the same batch
            first_ids.append([ids[mask.bool()].tolist() for feature in inputs[0]
                              for ids, mask in zip(feature["input_ids"], feature["attention_mask"])])

    with tempfile.TemporaryDirectory() as checkpoints:
        timer = StepTimer()
        trainer = build_trainer(st, data, config, checkpoints, callbacks=[timer])
        trainer.loss.register_forward_pre_hook(count)
        trainer.train()
    timed = list(zip(timer.times, step_tokens))[args.warmup:]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"backbone": type(backbone(st).base_model.model).__name__, "bidirectional": bidirectional,
            "threads": torch.get_num_threads(), "step_seconds": [round(s, 2) for s, _ in timed],
            "tokens_per_s": [t / s for s, (t, _) in timed],
            "tokens_per_step": statistics.mean(t for _, (t, _) in timed),
            "padding": 1 - sum(t for _, (t, _) in timed) / sum(p for _, (_, p) in timed), "first_loss": losses[0],
            "losses": losses, "first_batch": hashlib.sha256(json.dumps(first_ids[0]).encode()).hexdigest()[:16],
            "dtype": str(next(backbone(st).base_model.model.parameters()).dtype)}


LOSS_TOLERANCE = 1e-4  # fp32: packed and padded attention give the same loss up to rounding (measured ~1e-6)
LABELS = {"diffembed": "DiffEmbed (packed, SDPA per text)", "baseline": "LlamaModel+PEFT+ST (sdpa, padded)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 (both at their default), bf16 (frozen base in "
                        "bf16, LoRA and optimizer in fp32), or both")
    parser.add_argument("--work", help="folder for the converted models (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script: a tiny GGUF file of the same "
                        "architecture, one round of one step on 32 rows (overrides the options); no figure is a "
                        "measurement")
    parser.add_argument("--worker", choices=["diffembed", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        import logging
        import warnings

        logging.basicConfig(level=logging.ERROR)
        warnings.filterwarnings("ignore")
        print(json.dumps(run_variant(args)))
        return

    from diffembed_hf.builtin_task import TRAIN_MODULES, build_rows

    if args.smoke:
        args.rounds, args.steps, args.warmup, args.batch_size, args.max_seq_length = 1, 1, 1, 4, 32
    work = Path(args.work or tempfile.mkdtemp(prefix="diffembed-train-cpu-"))
    if args.smoke and not args.work:
        atexit.register(shutil.rmtree, work, True)
    folders = {"diffembed": converted_smollm2(work / "smollm2", smoke=args.smoke),
               "baseline": baseline_folder(work, args.smoke)}
    data = work / "train.jsonl"
    rows = build_rows(TRAIN_MODULES)[:32 if args.smoke else None]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    dtypes = args.dtypes.split(",")
    runs: dict[tuple[str, str], list[dict]] = {(kind, dtype): [] for dtype in dtypes for kind in LABELS}
    for round_ in range(args.rounds):
        for dtype in dtypes:
            for kind in LABELS:  # alternating: a busy spell on a shared machine hits both
                command = [sys.executable, __file__, "--worker", kind, "--folder", str(folders[kind]), "--data",
                           str(data), "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size",
                           str(args.batch_size), "--max-seq-length", str(args.max_seq_length)]
                done = subprocess.run(command + (["--bf16"] if dtype == "bf16" else []), capture_output=True,
                                      text=True)
                if done.returncode:
                    raise SystemExit(f"{kind} {dtype} failed:\n{done.stderr[-3000:]}")
                runs[kind, dtype].append(json.loads(done.stdout.strip().splitlines()[-1]))
            ours, peer = runs["diffembed", dtype][-1], runs["baseline", dtype][-1]
            if ours["first_batch"] != peer["first_batch"]:
                raise SystemExit(f"round {round_ + 1}, {dtype}: the two variants saw different first batches")
            gap = abs(ours["first_loss"] - peer["first_loss"])
            print(f"round {round_ + 1} {dtype}: same first batch; first loss {ours['first_loss']:.6f} vs "
                  f"{peer['first_loss']:.6f} (difference {gap:.1e})", flush=True)
            if dtype == "fp32" and gap > LOSS_TOLERANCE:
                raise SystemExit(f"fp32 first losses differ by {gap:.1e} > {LOSS_TOLERANCE}: not the same computation")

    medians = {key: statistics.median(rate for run in results for rate in run["tokens_per_s"])
               for key, results in runs.items()}
    first = next(iter(runs.values()))[0]
    model = ("a tiny GGUF file of SmolLM2's architecture (2 layers, hidden 576; --smoke)" if args.smoke
             else "SmolLM2-135M-Instruct (30 layers, hidden 576)")
    print(f"\nCPU training, {model}, {first['threads']} threads, "
          f"torch {torch.__version__} | LoRA r16 on 7 projections, InfoNCE + 1 hard negative, batch {args.batch_size}, "
          f"inputs cut at {args.max_seq_length} tokens, no gradient checkpointing | {args.rounds} rounds x "
          f"{args.steps} timed steps; ratio against the baseline in fp32 (its default) and in the same dtype")
    print(f"{'model':<40}{'dtype':>6}{'bidir':>6}{'tok/step':>9}{'pad':>5}{'tok/s':>8}{'vs fp32 base':>13}"
          f"{'vs same':>8}  losses (round 1) | s/step per round")
    for (kind, dtype), results in runs.items():
        run = results[0]
        print(f"{LABELS[kind]:<40}{dtype:>6}{str(run['bidirectional']):>6}{run['tokens_per_step']:>9.0f}"
              f"{run['padding']:>5.0%}{medians[kind, dtype]:>8.1f}"
              f"{medians[kind, dtype] / medians.get(('baseline', 'fp32'), float('nan')):>13.2f}"
              f"{medians[kind, dtype] / medians['baseline', dtype]:>8.2f}  "
              + " ".join(f"{loss:.3f}" for loss in run["losses"]) + " | "
              + " | ".join(" ".join(f"{s:.1f}" for s in r["step_seconds"]) for r in results))


if __name__ == "__main__":
    main()
