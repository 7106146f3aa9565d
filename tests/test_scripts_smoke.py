"""Every script in benchmarks/ and examples/ runs its `--smoke` mode on the CPU: a tiny model, every lazy import,
setup and table of the script, with the cells only a CUDA GPU can fill printed as "skipped: needs CUDA".

A GPU is lent for minutes at a time (issue 30): whatever can fail without one (a stale import, a renamed function,
a table that no longer formats) must fail here first. Each script runs in its own process, as a user starts it;
the test reads the table it printed (its real row and column names), the cells it says it skipped, and, as a
control, that a script with nothing GPU-only says it skipped nothing.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers.processes import launch

ROOT = Path(__file__).resolve().parents[1]
SKIPPED = "skipped: needs CUDA"


@dataclass(frozen=True)
class Smoke:
    """What one script's smoke run must print: `table` strings anywhere in its output, and, for each label in
    `cuda_only`, a line that holds the label and says it was skipped (empty: no line may say so)."""

    table: tuple[str, ...]
    cuda_only: tuple[str, ...] = ()


SCRIPTS = {
    "benchmarks/compact.py": Smoke(
        table=("| vectors", "bytes/vector", "stdlib plain", "stdlib MRL", "3rd-party plain", "3rd-party MRL",
               "| float32 ", "| int8 ", "| binary + rescore 40 ", "| binary, 64 dims ",
               "| precision | bytes/vector | shard bytes | ratio to float32 |", "| binary | ")),
    "benchmarks/compact_real_model.py": Smoke(
        table=("| vectors | bytes/vector |", "stdlib plain", "manpages MRL", "third-party plain", "| float32 |",
               "| float32, 72 dims |", "| int8, 144 dims |", "| binary + rescore 40 |", "| binary, 288 dims |",
               "plain: trained", "matryoshka: trained")),
    "benchmarks/corpus_throughput.py": Smoke(
        table=("mode", "seconds", "texts/s", "ratio", "one process ", "one process, 1 thread", "torchrun, 2 ranks")),
    "benchmarks/cpu_throughput.py": Smoke(
        table=("unsorted tok/s", "sorted tok/s", "peak RSS MB", "transformers Qwen2Model (sdpa)", "DiffEmbed auto [",
               "DiffEmbed sdpa (padded)", "parity: max |embedding difference| vs Qwen2Model",
               "torch.compile (fullgraph, dynamic, inductor) against eager", "compiled/eager")),
    "benchmarks/encode_file_mode.py": Smoke(
        table=("file mode", "seconds", "tokens/s", "before: SentenceTransformer.encode, batch_size 32 (padded)",
               "after: packed encoder", "max |difference| between the two")),
    "benchmarks/gpu_checks.py": Smoke(
        table=("check", "verdict", "result", "kernels installed", "automatic attention path",
               "training attention path", "merged model reloads to the trained embeddings",
               "GradCache first loss vs plain", "training tokens/s, recipe batch 4",
               "training speed-up over Qwen2Model+PEFT+ST", "first loss, DiffEmbed vs baseline",
               "benchmark attention path (backward)", "training gradcache: tokens/s, peak memory",
               "training long: tokens/s, peak memory", "FP8 vs bf16 inference speed, cosine",
               "FP8 vs bf16 retrieval (demo's held-out task)"),
        cuda_only=("kernel self-checks", "training long: tokens/s, peak memory", "FP8 vs bf16 inference speed")),
    "benchmarks/gpu_throughput.py": Smoke(
        table=("batches", "tok/s", "MFU", "speedup", "act. GiB", "padding", "transformers Qwen2Model sdpa",
               "DiffEmbed sdpa (padded)", "DiffEmbed auto [", "single long document", "embeddings, relative error"),
        cuda_only=("varlen kernel grouped-head mode", "weights of both models", "single long document",
                   "transformers Qwen2Model sdpa", "DiffEmbed auto, several GPUs")),
    "benchmarks/memory_estimate.py": Smoke(
        table=("estimate MiB", "measured MiB", "encode (16,384 tokens per batch), 16 tokens",
               "train LoRA, CPU recipe, batch 8, 32 tokens: the step", "train full fine-tuning, batch 8, 16 tokens",
               "GPU, recorded 2026-11-25", "one document of 131,072 tokens")),
    "benchmarks/quality.py": Smoke(
        table=("reasoning ndcg", "stdlib ndcg", "manpages ndcg", "BM25 (baseline)", "untrained (baseline)",
               "MiniLM-L6 (baseline)", "| row | steps | training min | load avg |", "smoke: 2 steps", "curves: ")),
    "benchmarks/read_inputs.py": Smoke(
        table=("ours/peer", "jsonl, one pass", "csv, one pass", "jsonl.gz, one pass", "stream kept",
               "the same, stream dropped per shard", "csv.DictReader")),
    "benchmarks/real_model.py": Smoke(table=("DiffEmbedForEmbedding, 2 layers, hidden 576",)),
    "benchmarks/train_throughput.py": Smoke(
        table=("setting", "tok/step", "MFU", "HFU", "peak RSS GiB", "loss[0]", "recipe b4", "gradcache b8 (mini 2)",
               "DiffEmbed [", "Qwen2Model+PEFT+ST (sdpa, padded)", "attention calls, recipe"),
        cuda_only=("long b4",)),
    "benchmarks/train_throughput_cpu.py": Smoke(
        table=("round 1 fp32: same first batch", "round 1 bf16: same first batch", "dtype", "vs fp32 base",
               "DiffEmbed (packed, SDPA per text)", "LlamaModel+PEFT+ST (sdpa, padded)")),
    "examples/convert_finetune_publish.py": Smoke(table=("held-out nDCG@10:", "would upload:", "model.safetensors")),
    "examples/rank_with_sentence_transformers.py": Smoke(
        table=("def qsize(self):", "def join(self):", "def put_nowait(self, item):")),
}


def run_smoke(script: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """`python SCRIPT --smoke` from the repository root, in its own process group (killed whole on timeout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_NO_ADVISORY_WARNINGS="1")
    return launch([script, "--smoke"], timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow  # about 15 processes, each a few seconds to a minute on 2 cores: several minutes in all
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_smoke(script):
    smoke = SCRIPTS[script]
    done = run_smoke(script)
    out = done.stdout
    assert done.returncode == 0, f"{script} --smoke exited {done.returncode}:\n{out[-6000:]}"
    missing = [name for name in smoke.table if name not in out]
    assert not missing, f"{script} --smoke did not print {missing}:\n{out[-6000:]}"
    lines = out.splitlines()
    for label in smoke.cuda_only:
        assert any(label in line and SKIPPED in line for line in lines), \
            f"{script}: no line with {label!r} says {SKIPPED!r}:\n{out[-6000:]}"
    if not smoke.cuda_only:  # the control: a script with nothing GPU-only skips nothing
        assert SKIPPED not in out, f"{script} skipped something it should run on the CPU:\n{out[-6000:]}"


def test_every_script_has_a_smoke_run():
    """A new script in benchmarks/ or examples/ cannot be missed: the parametrization above must name it."""
    scripts = {str(p.relative_to(ROOT)) for folder in ("benchmarks", "examples") for p in (ROOT / folder).glob("*.py")}
    assert scripts == set(SCRIPTS), (f"without a smoke entry: {sorted(scripts - set(SCRIPTS))}; "
                                     f"entries without a script: {sorted(set(SCRIPTS) - scripts)}")
