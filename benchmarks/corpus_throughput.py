"""Corpus encoding throughput: one process vs `torchrun --nproc-per-node 2` on this machine's CPUs.

The same `diffembed encode MODEL -i corpus.jsonl -o OUT/` command both ways (the small default demo model with
the real Dream tokenizer, random weights; generated texts of 5-300 words; shards of 1,000 rows), timed end to
end (start-up, model load and the corpus scan included), median of `--repeats` runs. The single process gets
as many threads as the two ranks together, so the ratio is what spreading shards over ranks buys; a second
single-process line with one thread shows how much of that is OpenMP threads contending for busy cores.

    python benchmarks/corpus_throughput.py            # about 3 minutes on 2 idle cores
    python benchmarks/corpus_throughput.py --smoke    # smoke test of the script: 40 texts in shards of 10, one run
"""

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the of and to in is for on that with as by this from at are be or an it which have not was but all "
         "embedding model corpus shard retrieval passage query vector token attention layer diffusion").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script: 40 texts in shards of 10, "
                        "one run of each mode (overrides --texts and --repeats); no figure is a measurement")
    args = parser.parse_args()
    if args.smoke:
        args.texts, args.repeats = 40, 1
    shard_size = 10 if args.smoke else 1000

    from diffembed_hf import load_dream_tokenizer
    from diffembed_hf.demo import build_default_model
    from diffembed_hf.sentence_transformer import save_sentence_transformer

    work = Path(tempfile.mkdtemp(prefix="corpus-bench-"))
    model = save_sentence_transformer(build_default_model(), load_dream_tokenizer(), work / "model", max_seq_length=512)
    rng = random.Random(0)
    with open(work / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for i in range(args.texts):
            words = rng.choice((5, 20, 50, 100, 300))
            handle.write(json.dumps({"_id": str(i), "text": " ".join(rng.choices(WORDS, k=words))}) + "\n")

    cores = os.cpu_count() or 1
    base_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base_env["HF_HUB_OFFLINE"] = "1"
    encode = ["-m", "diffembed_hf", "encode", str(model), "-i", str(work / "corpus.jsonl"), "--shard-size",
              str(shard_size), "--device", "cpu", "--no-progress"]
    modes = {
        "one process": (lambda out: [sys.executable, *encode, "-o", f"{out}/"], dict(OMP_NUM_THREADS=str(cores))),
        "one process, 1 thread": (lambda out: [sys.executable, *encode, "-o", f"{out}/"], dict(OMP_NUM_THREADS="1")),
        f"torchrun, {args.ranks} ranks": (lambda out: [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), *encode, "-o", f"{out}/"],
            dict(OMP_NUM_THREADS=str(max(1, cores // args.ranks)))),
    }
    times = {name: [] for name in modes}
    load = os.getloadavg()
    for repeat in range(args.repeats):
        for name, (command, threads) in modes.items():  # interleaved, so that load changes hit both alike
            out = work / f"out-{repeat}-{len(times[name])}-{name[:3]}"
            times[name].append(timed(command(out), {**base_env, **threads}))
            shutil.rmtree(out)
    shutil.rmtree(work)

    print(f"\n{args.texts} texts, default demo model (hidden 128, 4 layers, Dream tokenizer), {cores} CPU cores, "
          f"shards of {shard_size}, median of {args.repeats} runs, wall time of the whole command")
    print(f"load average before/after: {load[0]:.1f} / {os.getloadavg()[0]:.1f}")
    header = f"{'mode':<24}{'seconds':>9}{'texts/s':>9}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    baseline = statistics.median(times["one process"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<24}{median:>9.1f}{args.texts / median:>9.0f}{baseline / median:>7.2f}")


if __name__ == "__main__":
    main()
