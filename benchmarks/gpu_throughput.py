"""GPU throughput, MFU, memory and longest document of DiffEmbed against transformers' Qwen2Model (padded SDPA).

Dream-7B shape (hidden 3584, 28 q / 4 kv heads of 128, MLP 18944), random bf16 weights, `--layers` of them
(28 = the full model). Both models share the weights and get the same texts: random ids whose lengths are
spread over 16..512 tokens, in batches that are unsorted (training, naive callers) or length-sorted
(sentence-transformers). One command, no network, no flash-attn needed; prints a table last.

    python benchmarks/gpu_throughput.py --layers 28     # about 3-5 minutes on one H100

On a machine with several GPUs it adds a multi-GPU line: one process per GPU (the layout of `diffembed encode`
under torchrun and of `embed_texts(devices="all")`), each with its own copy of the model and a round-robin share
of the length-sorted batches, timed from a common barrier; aggregate tokens/s and its ratio to one GPU. (Not run
yet: the lent machine has one GPU.)

    python benchmarks/gpu_throughput.py --smoke      # CPU smoke test of the script: a 2-layer model, 8 short texts

--smoke runs every part on the CPU (both models, both batch orders, the long documents, the accuracy against fp32)
with a 2-layer, 128-wide model of Dream's vocabulary and heads 4/2, texts of 16-48 tokens and one 256-token
document; MFU, GPU memory and the multi-GPU line are printed as "skipped: needs CUDA". No figure is a measurement.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SKIPPED = "skipped: needs CUDA"
PEAK_TFLOPS = 800.0  # bf16 dense matrix rate measured on the lent H100/H200 (docs/benchmarks.md)


def dream_config(layers: int) -> dict:
    return dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=layers,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6)


def smoke_config() -> dict:
    """--smoke: 2 layers, 128 wide, heads 4/2 of 32 (Dream's vocabulary)."""
    return dict(dream_config(2), hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)


def flops_per_text(cfg: dict, length: int) -> float:
    """Forward FLOPs of one text: 2 x non-embedding parameters per token plus full bidirectional attention."""
    hidden, inter, heads, kv, layers = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                          "num_key_value_heads", "num_hidden_layers"))
    head_dim = hidden // heads
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    attention = 4 * heads * head_dim * length  # QK^T and PV, per token
    return length * layers * (2 * per_layer + attention)


def make_batches(lengths, batch_size, sort, device, gen):
    if sort:
        lengths = sorted(lengths, reverse=True)
    batches = []
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start : start + batch_size]
        ids = torch.randint(0, 151643, (len(chunk), max(chunk)), generator=gen)
        mask = (torch.arange(max(chunk))[None] < torch.tensor(chunk)[:, None]).long()
        batches.append((ids.to(device), mask))  # the mask stays on the host, as a tokenizer returns it
    return batches


def cuda_time(fn, repeats):
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


def peak_gib(weights_gib: float) -> float | None:
    """Peak allocated GPU memory above the weights since reset_peak; None on a CPU (--smoke)."""
    return torch.cuda.max_memory_allocated() / 2**30 - weights_gib if torch.cuda.is_available() else None


def _gpu_share(rank, world, layers, lengths, batch_size, repeats, barrier, results):
    """One GPU's process for the multi-GPU line: the auto path on every `world`-th sorted batch."""
    from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    torch.manual_seed(0)
    with device:
        model = DiffEmbedForEmbedding._from_config(DiffEmbedConfig(**dream_config(layers), rope_theta=1e6),
                                                   dtype=torch.bfloat16).eval()
    batches = make_batches(lengths, batch_size, True, device, torch.Generator().manual_seed(0))[rank::world]
    with torch.inference_mode():
        run = lambda: [model(input_ids=ids, attention_mask=mask).embeddings for ids, mask in batches]  # noqa: E731
        run()  # warm-up
        barrier.wait()
        results.put((rank, cuda_time(run, repeats), sum(int(mask.sum()) for _, mask in batches)))


def multi_gpu_tokens_per_second(layers, lengths, batch_size, repeats) -> tuple[int, float]:
    """(GPUs, aggregate tokens/s) with one spawned process per visible GPU."""
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(world), context.Queue()
    procs = [context.Process(target=_gpu_share, args=(r, world, layers, lengths, batch_size, repeats, barrier, results))
             for r in range(world)]
    for proc in procs:
        proc.start()
    shares = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return world, sum(tokens for _, _, tokens in shares) / max(seconds for _, seconds, _ in shares)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long", type=str, default="8192,32768,65536,131072",
                        help="single-document lengths to try, comma-separated")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test of the script: a tiny model and short "
                        "texts (overrides the other options); no figure is a measurement")
    args = parser.parse_args()
    longest_text = 512
    if args.smoke:
        args.texts, args.batch_size, args.repeats, args.long, longest_text = 8, 4, 1, "256", 48

    from transformers import Qwen2Config, Qwen2Model

    from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding
    from diffembed_hf.modeling import attention_kernels as kernels

    if not args.smoke and not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU: --smoke runs the CPU smoke test of the script")
    device = torch.device("cpu" if args.smoke else "cuda")
    cfg = smoke_config() if args.smoke else dream_config(args.layers)
    torch.manual_seed(0)
    with torch.device(device):
        ours = DiffEmbedForEmbedding._from_config(DiffEmbedConfig(**cfg, rope_theta=1e6), dtype=torch.bfloat16).eval()
        qcfg = Qwen2Config(**cfg, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
        qcfg.is_causal = False
        ref = Qwen2Model._from_config(qcfg, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ref.load_state_dict(ours.model.state_dict())
    backend = ours.attention_backend
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, longest_text + 1, (args.texts,), generator=gen).tolist()
    tokens = sum(lengths)
    flops = sum(flops_per_text(cfg, n) for n in lengths)

    def run_ref(batches):
        out = []
        for ids, mask in batches:
            mask = mask.to(device)
            hidden = ref(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.float()[..., None]
            out.append(F.normalize((hidden.float() * m).sum(1) / m.sum(1), dim=-1))
        return torch.cat(out)

    def run_ours(batches, attn):
        ours.config._attn_implementation = attn
        return torch.cat([ours(input_ids=ids, attention_mask=mask).embeddings for ids, mask in batches])

    rows, parity = [], {}
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else 0.0  # subtracted from peaks
    with torch.inference_mode():
        for order in ("unsorted", "sorted"):
            batches = make_batches(lengths, args.batch_size, order == "sorted", device, gen)
            padded_tokens = sum(ids.numel() for ids, _ in batches)
            variants = {"transformers Qwen2Model sdpa": lambda: run_ref(batches),
                        "DiffEmbed sdpa (padded)": lambda: run_ours(batches, "sdpa"),
                        f"DiffEmbed auto [{backend}]": lambda: run_ours(batches, None)}
            results = {}
            for name, fn in variants.items():
                fn()  # warm-up (kernel selection, probes)
                reset_peak()
                seconds = cuda_time(fn, args.repeats)
                results[name] = (seconds, peak_gib(weights_gib))
            base = results["transformers Qwen2Model sdpa"][0]
            for name, (seconds, mem) in results.items():
                rows.append((order, name, tokens / seconds, flops / seconds / 1e12 / PEAK_TFLOPS, base / seconds, mem,
                             1 - tokens / padded_tokens))
            if order == "unsorted":
                parity_batches = batches[:2]

        longest = {}
        ours.config._attn_implementation = None
        warm = torch.randint(0, 151643, (1, 64 if args.smoke else 1024), device=device)
        ours(input_ids=warm, attention_mask=torch.ones(warm.shape)), ref(input_ids=warm)  # kernel selection, unclocked
        for length in (int(x) for x in args.long.split(",")):
            ids = torch.randint(0, 151643, (1, length), device=device)
            for name, fn in (("ours", lambda: ours(input_ids=ids, attention_mask=torch.ones(1, length)).embeddings),
                             ("ref", lambda: ref(input_ids=ids).last_hidden_state)):
                ours.config._attn_implementation = None
                try:
                    reset_peak()
                    seconds = cuda_time(fn, 1)
                    longest[(name, length)] = (seconds, peak_gib(weights_gib))
                except torch.OutOfMemoryError:
                    longest[(name, length)] = None
                reset_peak()

        # Accuracy against an fp32 run of the same weights (bf16 -> fp32 -> bf16 is exact, so ours is restored).
        errors = {}
        outputs = {"transformers Qwen2Model sdpa": run_ref(parity_batches),
                   "DiffEmbed sdpa (padded)": run_ours(parity_batches, "sdpa"),
                   "DiffEmbed auto": run_ours(parity_batches, None)}
        ref = None  # its memory goes before the long documents (run_ref is not called again)
        reset_peak()
        ours.float()
        exact = run_ours(parity_batches, "sdpa")
        ours.to(torch.bfloat16)
        for name, emb in outputs.items():
            errors[name] = ((emb - exact).norm() / exact.norm()).item()
        parity["varlen vs transformers"] = ((outputs["DiffEmbed auto"] - outputs["transformers Qwen2Model sdpa"]).norm()
                                            / outputs["transformers Qwen2Model sdpa"].norm()).item()

    gqa = sorted({str(v) for v in kernels._kernel_probe_cache.values()}) if device.type == "cuda" else SKIPPED
    machine, shape = ((torch.cuda.get_device_name(), f"Dream-7B shape, {args.layers} layers") if not args.smoke else
                      ("CPU smoke test (--smoke): no figure is a measurement", "2 layers, hidden 128, heads 4/2"))
    print(f"\n{machine} | torch {torch.__version__} | {shape}, bf16 | "
          f"{args.texts} texts of 16-{longest_text} tokens ({tokens} real tokens), batch {args.batch_size}")
    print(f"varlen kernel grouped-head mode: {gqa}; embeddings, relative error: varlen vs transformers padded SDPA "
          f"{parity['varlen vs transformers']:.2e}; vs fp32: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    print(f"weights of both models: {f'{weights_gib:.1f} GiB' if device.type == 'cuda' else SKIPPED}; peaks below "
          "are above that")
    print("single long document (forward seconds, peak activation GiB): " + ", ".join(
        f"{name}@{n}: " + ("OOM" if res is None else f"{res[0]:.2f}s " + (SKIPPED if res[1] is None else
                                                                          f"{res[1]:.1f}GiB"))
        for (name, n), res in longest.items()))
    header = f"{'batches':<10}{'model':<36}{'tok/s':>9}{'MFU':>7}{'speedup':>9}{'act. GiB':>10}{'padding':>9}"
    print(header)
    print("-" * len(header))
    for order, name, tps, mfu, speedup, mem, pad in rows:
        if device.type == "cuda":
            print(f"{order:<10}{name:<36}{tps:>9.0f}{mfu:>7.1%}{speedup:>9.2f}{mem:>10.1f}{pad:>9.0%}")
        else:  # the MFU is of a GPU's bf16 peak, the memory a GPU's
            print(f"{order:<10}{name:<36}{tps:>9.0f}{'-':>7}{speedup:>9.2f}{'-':>10}{pad:>9.0%}  MFU, act. GiB: "
                  f"{SKIPPED}")
    if device.type != "cuda":
        print(f"{'sorted':<10}{'DiffEmbed auto, several GPUs':<36}  {SKIPPED} (one process per GPU)")
    elif torch.cuda.device_count() > 1:
        del ours
        torch.cuda.empty_cache()
        single = rows[-1][2]  # sorted batches, DiffEmbed auto, one GPU
        gpus, aggregate = multi_gpu_tokens_per_second(args.layers, lengths, args.batch_size, args.repeats)
        print(f"{'sorted':<10}{f'DiffEmbed auto, {gpus} GPUs (1 process each)':<36}{aggregate:>9.0f}"
              f"{'':>7}{aggregate / single:>9.2f}  <- ratio to one GPU")


if __name__ == "__main__":
    main()
