"""CPU throughput and peak memory of DiffEmbed against transformers' Qwen2Model made bidirectional.

Both models get the same config, the same random weights, the same texts (random ids with lengths spread
uniformly over 16..512 tokens) and the same fp32 mean pooling. Measured on unsorted batches (what training
and naive callers send) and on length-sorted batches (what sentence-transformers sends). Each model runs in
its own subprocess so that peak RSS is its own. Prints a table of medians and ratios last.

A second table puts DiffEmbed under `torch.compile` (fullgraph, dynamic shapes, inductor) beside the same model
in eager mode, both fed packed batches (`cu_seq_lens_q`) as the package's encoder sends them: tokens/s of each,
their ratio, the largest vector difference, and the one-off compilation time (not in the rate).

    python benchmarks/cpu_throughput.py            # about 3-6 minutes on 2 cores
    python benchmarks/cpu_throughput.py --smoke    # smoke test of the script: a 2-layer, 64-wide model, 8 short texts
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def build_config(args):
    return dict(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
    )


def make_batches(args, sort: bool):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.texts,), generator=gen).tolist()
    if sort:
        lengths = sorted(lengths, reverse=True)
    batches = []
    for start in range(0, len(lengths), args.batch_size):
        chunk = lengths[start : start + args.batch_size]
        ids = torch.randint(0, 32000, (len(chunk), max(chunk)), generator=gen)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(chunk):
            mask[row, :n] = 1
        batches.append((ids, mask))
    return batches, sum(lengths)


def mean_pool(hidden, mask):
    mask = mask.to(torch.float32)[..., None]
    return torch.nn.functional.normalize((hidden.float() * mask).sum(1) / mask.sum(1), dim=-1)


def build_model(name, config_kwargs):
    torch.manual_seed(0)
    if name == "qwen2":
        from transformers import Qwen2Config, Qwen2Model

        config = Qwen2Config(**config_kwargs, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                             attn_implementation="sdpa")
        config.is_causal = False  # honoured by transformers >= 5.2
        model = Qwen2Model(config)

        def embed(ids, mask):
            return mean_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)

    else:
        from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding

        config = DiffEmbedConfig(**config_kwargs, rope_theta=1e6, pad_token_id=None, bos_token_id=None,
                                 eos_token_id=None)
        model = DiffEmbedForEmbedding(config)
        model.config._attn_implementation = None if name == "diffembed" else "sdpa"

        def embed(ids, mask):
            return model(input_ids=ids, attention_mask=mask).embeddings

    model.eval()
    return model, embed


def packed_batches(batches):
    """The same texts packed as the encoder sends them: `[1, total]` ids, host cu_seq_lens_q, max_length_q."""
    packed = []
    for ids, mask in batches:
        lengths = mask.sum(1).tolist()
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        packed.append(dict(input_ids=ids[mask.bool()][None], cu_seq_lens_q=cu, max_length_q=max(lengths)))
    return packed


def compiled_worker(args):
    """Eager and compiled DiffEmbed on packed batches in one process (same weights): rates, compile time, max diff."""
    torch.set_num_threads(args.threads)
    model, _ = build_model("diffembed", build_config(args))
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    result = {}
    with torch.inference_mode():
        for order in ("unsorted", "sorted"):
            batches, tokens = make_batches(args, sort=order == "sorted")
            batches = packed_batches(batches)
            start = time.perf_counter()
            for batch in batches:  # compiles once (dynamic shapes), then warm for every length
                compiled(**batch)
            result.setdefault("compile_s", time.perf_counter() - start)
            diff = max((compiled(**b).embeddings - model(**b).embeddings).abs().max().item() for b in batches)
            result["max_diff"] = max(result.get("max_diff", 0.0), diff)
            times = {"eager": [], "compiled": []}
            for _ in range(args.repeats):  # alternated, so that a change in the machine's load hits both alike
                for name, run in (("eager", model), ("compiled", compiled)):
                    start = time.perf_counter()
                    for batch in batches:
                        run(**batch)
                    times[name].append(time.perf_counter() - start)
            for name, runs in times.items():
                result[f"{name}_{order}"] = tokens / statistics.median(runs)
    print(json.dumps(result))


def peak_rss_mb() -> float:
    """This process's own high-water RSS (VmHWM). Unlike ru_maxrss it does not inherit the parent's peak at exec."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args):
    """Run one model over both batch orders; print its timings as JSON."""
    torch.set_num_threads(args.threads)
    model, embed = build_model(args.worker, build_config(args))
    result = {"backend": getattr(model, "attention_backend", "sdpa (transformers)")}
    with torch.inference_mode():
        for order in ("unsorted", "sorted"):
            batches, tokens = make_batches(args, sort=order == "sorted")
            for ids, mask in batches[:2]:  # warm-up
                embed(ids, mask)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                for ids, mask in batches:
                    embed(ids, mask)
                times.append(time.perf_counter() - start)
            result[order] = tokens / statistics.median(times)
            result[order + "_pad_fraction"] = 1 - tokens / sum(ids.numel() for ids, _ in batches)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def check_parity(args):
    """Same weights must give the same embeddings before any timing means anything."""
    ref, ref_embed = build_model("qwen2", build_config(args))
    ours, our_embed = build_model("diffembed", build_config(args))
    ours.model.load_state_dict(ref.state_dict())
    ids, mask = make_batches(args, sort=False)[0][0]
    with torch.inference_mode():
        return (ref_embed(ids, mask) - our_embed(ids, mask)).abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script: a tiny model and a few "
                        "short texts (overrides the shape options); no figure is a measurement")
    parser.add_argument("--worker", choices=["qwen2", "diffembed", "diffembed-sdpa", "compiled"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:  # the workers get --smoke too (forwarded below) and shrink alike
        args.layers, args.hidden, args.heads, args.kv_heads = 2, 64, 4, 2
        args.texts, args.batch_size, args.min_len, args.max_len, args.repeats = 8, 4, 8, 32, 1
    if args.worker == "compiled":
        return compiled_worker(args)
    if args.worker:
        return worker(args)

    max_diff = check_parity(args)
    forwarded = [a for a in sys.argv[1:]]
    results = {}
    for name in ("qwen2", "diffembed", "diffembed-sdpa", "compiled"):
        out = subprocess.run([sys.executable, __file__, *forwarded, "--worker", name], check=True,
                             capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    compiled = results.pop("compiled")

    base = results["qwen2"]
    print(f"\nconfig: {args.layers} layers, hidden {args.hidden}, {args.heads} q / {args.kv_heads} kv heads, "
          f"{args.texts} texts of {args.min_len}-{args.max_len} tokens, batch {args.batch_size}, "
          f"{args.threads} threads, torch {torch.__version__}")
    print(f"parity: max |embedding difference| vs Qwen2Model = {max_diff:.2e}")
    print(f"padding in batches: unsorted {base['unsorted_pad_fraction']:.0%}, sorted {base['sorted_pad_fraction']:.0%}")
    header = (f"{'model':<34}{'unsorted tok/s':>15}{'ratio':>7}{'sorted tok/s':>14}{'ratio':>7}{'peak RSS MB':>13}"
              f"{'ratio':>7}")
    print(header)
    print("-" * len(header))
    labels = {"qwen2": "transformers Qwen2Model (sdpa)", "diffembed": "DiffEmbed auto",
              "diffembed-sdpa": "DiffEmbed sdpa (padded)"}
    for name, res in results.items():
        label = f"{labels[name]} [{res['backend']}]" if name != "qwen2" else labels[name]
        print(f"{label:<34}{res['unsorted']:>15.0f}{res['unsorted'] / base['unsorted']:>7.2f}"
              f"{res['sorted']:>14.0f}{res['sorted'] / base['sorted']:>7.2f}"
              f"{res['peak_rss_mb']:>13.0f}{res['peak_rss_mb'] / base['peak_rss_mb']:>7.2f}")
    print_compiled(compiled)


def print_compiled(res):
    print("\ntorch.compile (fullgraph, dynamic, inductor) against eager, DiffEmbed on packed batches "
          f"(compilation {res['compile_s']:.0f} s, not counted; max |vector difference| {res['max_diff']:.1e})")
    header = f"{'order':<10}{'eager tok/s':>13}{'compiled tok/s':>16}{'compiled/eager':>16}"
    print(header)
    print("-" * len(header))
    for order in ("unsorted", "sorted"):
        eager, compiled = res[f"eager_{order}"], res[f"compiled_{order}"]
        print(f"{order:<10}{eager:>13.0f}{compiled:>16.0f}{compiled / eager:>16.2f}")


if __name__ == "__main__":
    main()
