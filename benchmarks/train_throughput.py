"""Training throughput, MFU and peak memory of the DiffEmbed recipe against transformers' Qwen2Model + PEFT +
sentence-transformers, trained the same way.

Both run through this project's own trainer (`diffembed_hf.train.build_trainer`: sentence-transformers' trainer,
PEFT LoRA r=16 / alpha 32 on q/k/v/o/gate/up/down, InfoNCE x 50 with in-batch and one hard negative, gradient
checkpointing, bf16 on CUDA) on the same synthetic ReasonAug-shaped rows (an instruction + query of ~230 tokens,
a positive and a hard negative of ~500 tokens, random words tokenized by Dream's tokenizer) with the same
random weights. The only difference is the backbone: DiffEmbed (packed varlen attention, forward and backward)
or transformers' `Qwen2Model` made bidirectional (`is_causal=False`, padded SDPA), which sentence-transformers
wraps with mean pooling. Settings: the study's batch of 4 per GPU, GradCache with batch 64 (mini-batch 8), and
(GPU only) batch 4 with every text 4,096 tokens long, the recipe's worst case for memory.

FLOPs per text of L real tokens, per layer, with N = the layer's linear weights (frozen), P = its LoRA weights,
h = query heads and d = head dim. Model FLOPs (MFU, nothing counted twice):
    forward 2LN + 2LP + 4L^2hd;  backward 2LN (input gradient only: frozen weights get no weight gradient)
    + 4LP (input and weight gradients of the adapters) + 8L^2hd (dQ, dK, dV, dP)
    = 4LN + 6LP + 12L^2hd.
Hardware FLOPs (HFU) add what is computed again: gradient checkpointing's second forward (2LN + 2LP + 4L^2hd),
and GradCache's first, gradient-free forward over the whole batch (the same again). Padding is never counted:
tokens/s, MFU and HFU are of real tokens, so a padded baseline pays for its padding in all three.
The peak rate is measured in this run (a large matrix product: bf16 on CUDA, fp32 on CPU).

    python benchmarks/train_throughput.py          # one CUDA GPU, Dream-7B shape (28 layers, vocab 152k)
    python benchmarks/train_throughput.py --tiny   # CPU, a 2-layer model: the same table (10-20 minutes on 2 cores)
    python benchmarks/train_throughput.py --smoke  # CPU smoke test of the script: --tiny with short texts, 1 step

--smoke runs every part of the script (both workers in their own processes, the recipe and GradCache settings, the
table) with the 2-layer model, texts of a few dozen tokens, a GradCache batch of 8 (mini-batch 2) and one timed step;
the 4,096-token setting and GPU peak memory are printed as "skipped: needs CUDA". None of its figures is a
measurement.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DREAM = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
             num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6,
             rope_theta=1e6)
TINY = dict(DREAM, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
INSTRUCTION = "Given a coding problem, retrieve the relevant problems that can be solved by the similar algorithms:\n"
SKIPPED = "skipped: needs CUDA"
SMOKE_SETTINGS = {"recipe": (4, None), "gradcache": (8, 2)}  # --smoke: (batch size, GradCache mini-batch)
SETTINGS = {  # name: (batch size, GradCache mini-batch, query tokens, document tokens, warm-up steps, timed steps)
    "recipe": (4, None, (180, 280), (400, 600), 2, 8),
    "gradcache": (64, 8, (180, 280), (400, 600), 1, 2),
    "long": (4, None, (4096, 4096), (4096, 4096), 1, 2),
}


# ---- what both workers share --------------------------------------------------------------------------------


def flops_per_text(cfg: dict, length: int, lora_r: int) -> tuple[float, float]:
    """(model FLOPs, recomputed FLOPs of one extra forward) of one text in one training step (see the docstring)."""
    hidden, inter, heads, kv, layers = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                          "num_key_value_heads", "num_hidden_layers"))
    d = hidden // heads
    shapes = [(hidden, heads * d), (hidden, kv * d), (hidden, kv * d), (heads * d, hidden),
              (hidden, inter), (hidden, inter), (inter, hidden)]
    n = sum(i * o for i, o in shapes)
    p = sum(lora_r * (i + o) for i, o in shapes)
    attention = length * length * heads * d
    model = layers * (4 * length * n + 6 * length * p + 12 * attention)
    forward = layers * (2 * length * n + 2 * length * p + 4 * attention)
    return float(model), float(forward)


def synthetic_rows(tokenizer, count: int, query_range, doc_range, seed: int) -> list[dict]:
    """ReasonAug-shaped rows of random real words, cut to a target token count drawn for each text."""
    words = sorted({w.strip(".,;:()[]'\"").lower() for w in Path(json.__file__).read_text().split()
                    if w.strip(".,;:()[]'\"").isalpha()})
    rng = random.Random(seed)

    def text(tokens: int, prefix: str = "") -> str:
        budget = tokens - len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        ids = tokenizer(" ".join(rng.choices(words, k=budget)), add_special_tokens=False)["input_ids"][:budget]
        return prefix + tokenizer.decode(ids)

    return [{"anchor": text(rng.randint(*query_range), INSTRUCTION), "positive": text(rng.randint(*doc_range)),
             "negative_1": text(rng.randint(*doc_range))} for _ in range(count)]


def measured_peak_tflops(device: torch.device) -> float:
    """The dense matrix-product rate of this device: bf16 8192^3 on CUDA, fp32 1024^3 on CPU (median of 5)."""
    size, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(8):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_gib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


# ---- one variant, in its own process (its own peak memory) --------------------------------------------------


def build_backbone(kind: str, cfg: dict, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2Model

    from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding

    with torch.device(device):
        if kind == "diffembed":
            config = DiffEmbedConfig(**cfg, pad_token_id=151643, bos_token_id=None, eos_token_id=151643)
            model = DiffEmbedForEmbedding._from_config(config, dtype=dtype)
            named = {name.removeprefix("model."): p for name, p in model.named_parameters()}
        else:
            qcfg = Qwen2Config(**{k: v for k, v in cfg.items() if k != "rope_theta"}, pad_token_id=151643,
                               rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]})
            qcfg.is_causal = False  # bidirectional (transformers >= 5.2)
            model = Qwen2Model._from_config(qcfg, dtype=dtype, attn_implementation="sdpa")
            named = dict(model.named_parameters())
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():  # the same random weights in both models, parameter by parameter
        for name in sorted(named):
            param = named[name]
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    return model


def tiny_folder(kind: str, root: Path, cfg: dict) -> str:
    """A sentence-transformers folder with the real tokenizer and a small model of the same class; the
    benchmark swaps the full-size backbone in (writing 15 GB of random weights would only cost time)."""
    from diffembed_hf import load_dream_tokenizer
    from diffembed_hf.sentence_transformer import save_sentence_transformer

    folder = root / kind
    if folder.exists():
        return str(folder)
    small = build_backbone(kind, dict(cfg, num_hidden_layers=1, hidden_size=64, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2), torch.device("cpu"),
                           torch.float32)
    tokenizer = load_dream_tokenizer()
    if kind == "diffembed":
        save_sentence_transformer(small, tokenizer, folder, max_seq_length=4096)
    else:  # what a user of transformers does: a plain folder, which sentence-transformers gives mean pooling
        small.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return str(folder)


def run_variant(args) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from transformers import TrainerCallback

    from diffembed_hf.modeling import modeling_diffembed as mdl
    from diffembed_hf.train import TrainingConfig, backbone, build_trainer, set_backbone

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY if args.tiny else DREAM
    batch, mini, query_range, doc_range, warmup, steps = setting_shape(args.setting, args.smoke)
    steps = args.steps or steps
    if args.tiny:
        query_range = tuple(n // 4 for n in query_range)  # above the instruction's 20 tokens: distinct queries
        doc_range = tuple(n // (16 if args.smoke else 4) for n in doc_range)
        torch.set_num_threads(args.threads)

    st = SentenceTransformer(args.folder, device="cpu", trust_remote_code=True)
    st.max_seq_length = 4096
    set_backbone(st, build_backbone(args.worker, cfg, device, dtype))
    st.to(device)
    rows = synthetic_rows(st.tokenizer, batch * (warmup + steps), query_range, doc_range, seed=1)
    config = TrainingConfig(max_steps=warmup + steps, batch_size=batch, gradcache_mini_batch_size=mini,
                            warmup_steps=0, learning_rate=1e-4, save_steps=10**9, logging_steps=1,
                            max_seq_length=4096, eval_fraction=0.0)

    # Which attention path ran: every call of DiffEmbed's attention, and every gradient that came back through it.
    paths: dict[str, int] = {}
    original_attention = mdl.attention

    def counted_attention(q, k, v, layout, scale, causal):
        out = original_attention(q, k, v, layout, scale, causal)
        paths[f"forward {layout.backend}"] = paths.get(f"forward {layout.backend}", 0) + 1
        if out.requires_grad:
            def count_backward(grad, backend=layout.backend):
                paths[f"backward {backend}"] = paths.get(f"backward {backend}", 0) + 1
            out.register_hook(count_backward)
        return out

    mdl.attention = counted_attention

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], 0.0

        def on_step_begin(self, *a, **k):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            self.times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as checkpoints:
        timer = StepTimer()
        trainer = build_trainer(st, Dataset.from_list(rows), config, checkpoints, callbacks=[timer])
        step_tokens: list[tuple[int, int, float, float]] = []  # real tokens, padded tokens, model/extra FLOPs

        def count(module, inputs):
            features = inputs[0]
            real = padded = 0
            model_flops = extra = 0.0
            for feature in features:
                mask = feature["attention_mask"]
                padded += mask.numel()
                for length in mask.sum(1).tolist():
                    real += length
                    f_model, f_forward = flops_per_text(cfg, int(length), config.lora_r)
                    model_flops += f_model
                    extra += f_forward * (2 if mini else 1)  # checkpointing's recompute (+ GradCache's pass)
            step_tokens.append((real, padded, model_flops, extra))

        trainer.loss.register_forward_pre_hook(count)
        if device.type == "cuda":  # the peak includes the weights, LoRA, optimizer state and activations
            torch.cuda.reset_peak_memory_stats(device)
        trainer.train()
    mdl.attention = original_attention

    timed = list(zip(timer.times, step_tokens))[warmup:]  # (seconds, (real, padded, model FLOPs, extra FLOPs))
    tokens = sum(t[0] for _, t in timed)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {  # rates are medians over the timed steps: one slow step on a shared machine does not move them
        "backbone": type(backbone(st).base_model.model).__name__,
        "steps": len(timed),
        "step_seconds": statistics.median(s for s, _ in timed),
        "tokens_per_s": statistics.median(t[0] / s for s, t in timed),
        "model_flops_per_s": statistics.median(t[2] / s for s, t in timed),
        "hardware_flops_per_s": statistics.median((t[2] + t[3]) / s for s, t in timed),
        "padding": 1 - tokens / sum(t[1] for _, t in timed),
        "tokens_per_step": tokens / len(timed),
        "peak_gib": (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gib()),
        "first_loss": losses[0],
        "losses_finite": all(math.isfinite(x) for x in losses),
        "paths": paths,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
    }
    return result


def setting_shape(setting: str, smoke: bool) -> tuple:
    """SETTINGS[setting], with --smoke's smaller batch, one warm-up step and one timed step."""
    batch, mini, query_range, doc_range, warmup, steps = SETTINGS[setting]
    if smoke:
        (batch, mini), warmup, steps = SMOKE_SETTINGS[setting], 1, 1
    return batch, mini, query_range, doc_range, warmup, steps


# ---- the table -------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU, a 2-layer 128-wide model with Dream's vocabulary")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test of the script: --tiny with short "
                        "texts, small batches and one step; no figure is a measurement")
    parser.add_argument("--settings", default=None,
                        help="comma-separated subset of recipe,gradcache,long (default: all on GPU, recipe,gradcache "
                             "with --tiny)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: per setting)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times, alternating, "
                        "and report medians (for shared, noisy machines)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=["diffembed", "qwen2"], help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.tiny = args.tiny or args.smoke
    logging.basicConfig(level=logging.ERROR)
    if args.worker:
        print(json.dumps(run_variant(args)))
        return None

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA GPU here: run with --tiny for the CPU version")
    settings = (args.settings or ("recipe,gradcache" if args.tiny else "recipe,gradcache,long")).split(",")
    if args.tiny:
        torch.set_num_threads(args.threads)
    peak = measured_peak_tflops(device)
    cfg = TINY if args.tiny else DREAM
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.rounds):  # rounds alternate the two models: a busy spell on a shared machine hits both
            for setting in settings:
                for kind in ("diffembed", "qwen2"):
                    folder = tiny_folder(kind, Path(root), cfg)
                    command = [sys.executable, __file__, "--worker", kind, "--setting", setting, "--folder", folder,
                               "--threads", str(args.threads)] + (["--tiny"] if args.tiny else []) + \
                              (["--smoke"] if args.smoke else []) + \
                              (["--steps", str(args.steps)] if args.steps else [])
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode:
                        runs.setdefault((setting, kind), []).append(
                            {"error": done.stderr.strip().splitlines()[-1][:200]})
                        print(done.stderr[-3000:], file=sys.stderr)
                    else:
                        runs.setdefault((setting, kind), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {key: median_of_runs(values) for key, values in runs.items()}
    print_table(results, cfg, peak, device, args)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{s}/{k}": v for (s, k), v in results.items()}, indent=2))
    return results


def median_of_runs(runs: list[dict]) -> dict:
    """One variant's result over its rounds: the median of every rate, the largest peak memory."""
    good = [r for r in runs if "error" not in r]
    if not good:
        return runs[0]
    merged = dict(good[0], rounds=len(good))
    for key in ("step_seconds", "tokens_per_s", "model_flops_per_s", "hardware_flops_per_s"):
        merged[key] = statistics.median(r[key] for r in good)
    merged["peak_gib"] = max(r["peak_gib"] for r in good)
    merged["tokens_per_s_rounds"] = [round(r["tokens_per_s"]) for r in good]
    return merged


def print_table(results, cfg, peak, device, args):
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{args.threads}-thread CPU") + f", torch {torch.__version__}"
    print(f"\n{machine} | {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, MLP {cfg['intermediate_size']}, "
          f"vocab {cfg['vocab_size']}, random {'bf16' if device.type == 'cuda' else 'fp32'} weights | LoRA r16 on 7 "
          f"projections, gradient checkpointing, InfoNCE + 1 hard negative | peak {peak * 1e3:.0f} GFLOP/s measured")
    memory = "peak GiB" if device.type == "cuda" else "peak RSS GiB"
    header = (f"{'setting':<24}{'model':<36}{'tok/step':>9}{'pad':>5}{'s/step':>8}{'tok/s':>9}{'ratio':>7}"
              f"{'MFU':>7}{'HFU':>7}{memory:>13}{'ratio':>7}{'loss[0]':>9}")
    print(header)
    print("-" * len(header))
    labels = {"diffembed": "DiffEmbed", "qwen2": "Qwen2Model+PEFT+ST (sdpa, padded)"}
    for (setting, kind), res in results.items():
        batch, mini = setting_shape(setting, args.smoke)[:2]
        name = f"{setting} b{batch}" + (f" (mini {mini})" if mini else "")
        if "error" in res:
            print(f"{name:<24}{labels[kind]:<36}  failed: {res['error']}")
            continue
        base = results.get((setting, "qwen2"), {})
        label = labels[kind]
        if kind == "diffembed":
            backends = sorted({p.split()[1] for p in res["paths"] if p.startswith("backward")})  # what trained
            label = f"DiffEmbed [{','.join(backends)}]"
        ratio = res["tokens_per_s"] / base["tokens_per_s"] if "tokens_per_s" in base else float("nan")
        mem_ratio = res["peak_gib"] / base["peak_gib"] if "peak_gib" in base else float("nan")
        print(f"{name:<24}{label:<36}{res['tokens_per_step']:>9.0f}{res['padding']:>5.0%}{res['step_seconds']:>8.2f}"
              f"{res['tokens_per_s']:>9.0f}{ratio:>7.2f}{res['model_flops_per_s'] / 1e12 / peak:>7.1%}"
              f"{res['hardware_flops_per_s'] / 1e12 / peak:>7.1%}{res['peak_gib']:>13.2f}{mem_ratio:>7.2f}"
              f"{res['first_loss']:>9.4f}")
    if args.smoke:
        print(f"{'long b4':<24}{'DiffEmbed, Qwen2Model+PEFT+ST':<36}  {SKIPPED} (4,096-token texts: GPU memory)")
    if args.rounds > 1:
        print("tokens/s of each round: " + "; ".join(f"{s} {k}: {r.get('tokens_per_s_rounds')}"
                                                    for (s, k), r in results.items()))
    for (setting, kind), res in results.items():
        if kind == "diffembed" and "paths" in res:
            print(f"attention calls, {setting}: " + ", ".join(f"{k} x{v}" for k, v in sorted(res["paths"].items())))


if __name__ == "__main__":
    main()
