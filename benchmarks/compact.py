"""What compact vectors cost: nDCG@10 at each truncation and precision, for a model trained with and without
Matryoshka dimensions (same steps, same data), and corpus shard sizes at int8 and binary against float32.

    OMP_NUM_THREADS=1 python benchmarks/compact.py              # the demo's default model; 85 min on 2 busy cores
    OMP_NUM_THREADS=1 python benchmarks/compact.py --steps 100  # a quicker, weaker run
    python benchmarks/compact.py --smoke                         # smoke test of the script: seconds, no figures

(One OpenMP thread: on shared cores two spinning threads trained 4x slower.)

Models: the demo's default DiffEmbed model (4 layers, 128 wide, random init, Dream tokenizer) fine-tuned with the
demo's recipe (`diffembed demo`'s DEMO_TRAINING: full fine-tuning, batch 16, lr 1e-3, 128 tokens) on the demo's
standard-library task, once plain and once with `--matryoshka-dims 128,64,32,16`. Everything runs through the
package's own paths: `train.train`, `evaluation.evaluate` (mteb scoring, compact search) and `corpus.encode_corpus`.

Held-out sets: (1) the demo's task (`--suite stdlib`: standard-library modules not trained on), (2) the same kind
of rows from third-party code the models never saw (`huggingface_hub` and `datasets`, as installed), as a local
BEIR folder. The peer of each row is the same model's float32 full-width vectors, evaluated in the same run.

--smoke runs every part in a temporary folder with 1 training step of 8 rows at 32 tokens, 32 training rows, 16
queries of each held-out set read at 32 tokens, and 4 of the 8 settings (float32; int8; binary with rescoring;
binary at 64 dimensions: every compaction path); no figure is a measurement.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HELD_OUT_PACKAGES = ("huggingface_hub", "datasets")
MATRYOSHKA_DIMS = [128, 64, 32, 16]
RESCORE = 40  # binary candidates rescored per query (4 x the 10 that nDCG@10 reads)


def settings(smoke: bool = False) -> list[tuple[str, dict]]:
    """The table's rows: (label, evaluate's options); `smoke`: one of each compaction path."""
    if smoke:
        return [("float32", {}), ("int8", {"precision": "int8"}),
                (f"binary + rescore {RESCORE}", {"precision": "binary", "rescore": RESCORE}),
                ("binary, 64 dims", {"precision": "binary", "truncate_dim": 64})]
    rows = [("float32", {})]
    rows += [(f"float32, {d} dims", {"truncate_dim": d}) for d in MATRYOSHKA_DIMS[1:]]
    rows += [("int8", {"precision": "int8"}), ("binary", {"precision": "binary"}),
             (f"binary + rescore {RESCORE}", {"precision": "binary", "rescore": RESCORE}),
             ("binary, 64 dims", {"precision": "binary", "truncate_dim": 64})]
    return rows


def third_party_beir(folder: Path, rows: int) -> tuple[str, str]:
    """A BEIR folder of docstring summary -> function code from code the models never saw; (path, versions)."""
    import importlib.metadata

    from datasets import Dataset

    from diffembed_hf.builtin_task import build_rows
    from diffembed_hf.training_data import resolve_columns, to_training_rows
    from diffembed_hf.heldout import retrieval_task

    raw = Dataset.from_list(build_rows(HELD_OUT_PACKAGES)[:rows])
    columns, _ = to_training_rows(raw, "third-party", resolve_columns(raw, "third-party"))
    queries, corpus, relevant = retrieval_task(Dataset.from_dict(columns))
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": i, "title": "", "text": t}) + "\n" for i, t in corpus.items())
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries.items())
    with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q, docs in relevant.items() for d in sorted(docs))
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in HELD_OUT_PACKAGES)
    return str(folder), f"{len(queries)} queries, {len(corpus)} documents ({versions})"


def train_models(work: Path, steps: int, smoke: bool = False) -> dict[str, str]:
    from diffembed_hf.builtin_task import write_task
    from diffembed_hf.demo import DEMO_TRAINING, build_default_model
    from diffembed_hf.sentence_transformer import save_sentence_transformer
    from diffembed_hf.tokenization import load_dream_tokenizer
    from diffembed_hf.train import TrainingConfig, train

    train_file, heldout_file = write_task(work / "data", max_train=32 if smoke else None, max_eval=16 if smoke else 300)
    untrained = work / "untrained"
    if not untrained.exists():
        save_sentence_transformer(build_default_model(), load_dream_tokenizer(), untrained, max_seq_length=128)
    models = {}
    for name, extra in (("plain", {}), ("matryoshka", {"matryoshka_dims": MATRYOSHKA_DIMS})):
        out = work / name
        if not (out / "diffembed_training.json").is_file():
            config = TrainingConfig(**{**DEMO_TRAINING, "max_steps": steps, "logging_steps": max(1, steps // 4),
                                       "eval_fraction": 0.0,
                                       **({"batch_size": 8, "max_seq_length": 32, "warmup_steps": 0} if smoke else {})},
                                    **extra)
            start = time.perf_counter()
            train(str(untrained), str(train_file), out, config, device="cpu", overwrite=True)
            print(f"trained {name}: {steps} steps in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        models[name] = str(out)
    return models


def score_table(models: dict[str, str], beir: str, work: Path, smoke: bool = False) -> dict:
    from diffembed_hf.builtin_task import INSTRUCTION
    from diffembed_hf.evaluation.run import evaluate

    results = {}
    for label, options in settings(smoke):
        for name, folder in models.items():
            for task, where in (("stdlib", dict(suite="stdlib", stdlib_rows=16 if smoke else None)),
                                ("third-party", dict(data=beir, query_prompt=INSTRUCTION + ":\n"))):
                out = work / "eval" / f"{name}-{task}-{label.replace(' ', '_').replace(',', '')}"
                result = evaluate(folder, output=out, device="cpu", max_seq_length=32 if smoke else 128, **where,
                                  **options)
                (scores,) = result.summary.values()
                results[(label, name, task)] = (scores["main_score"], scores["bytes_per_vector"])
                print(f"  {label:<22} {name:<11} {task:<12} nDCG@10 {scores['main_score']:.4f}", file=sys.stderr)
    return results


def shard_sizes(model: str, work: Path, smoke: bool = False) -> list[tuple[str, int, int]]:
    """The corpus mode output of the demo task's documents (train and held-out) at three precisions (`smoke`: 40)."""
    from diffembed_hf.builtin_task import HELD_OUT_MODULES, TRAIN_MODULES, build_rows
    from diffembed_hf.corpus import encode_corpus
    from diffembed_hf.corpus.shards import read_manifest

    texts = sorted({r[k] for r in build_rows(TRAIN_MODULES + HELD_OUT_MODULES) for k in ("positive", "negative")})
    texts = texts[:40 if smoke else None]
    source = work / "corpus.jsonl"
    source.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    sizes = []
    for precision in ("float32", "int8", "binary"):
        out = work / f"shards-{precision}"
        encode_corpus(model, source, out, precision=precision, shard_size=1000, device="cpu", overwrite=True,
                      max_seq_length=128, show_progress_bar=False)
        manifest = read_manifest(out)  # .diffembed-manifest.json
        sizes.append((precision, manifest["bytes_per_vector"], sum(p.stat().st_size for p in out.glob("part-*"))))
    return sizes, len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400, help="training steps of each model (the demo's 400)")
    parser.add_argument("--work", help="folder for the task, models and results (default: a temporary folder; "
                        "an existing one reuses its trained models)")
    parser.add_argument("--heldout-rows", type=int, default=300, help="rows of the third-party held-out set")
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script: 1 step, a few rows, one "
                        "setting per compaction path, a temporary folder; no figure is a measurement")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.heldout_rows, args.work = 1, 16, tempfile.mkdtemp(prefix="diffembed-compact-smoke-")
        atexit.register(shutil.rmtree, args.work, True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="diffembed-compact-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = train_models(work, args.steps, args.smoke)
    beir, described = third_party_beir(work / "third-party", args.heldout_rows)
    results = score_table(models, beir, work, args.smoke)
    sizes, documents = shard_sizes(models["matryoshka"], work, args.smoke)

    print(f"\nnDCG@10 on held-out retrieval; demo model (128 wide), {args.steps} training steps each, same data and "
          f"seed; {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"stdlib: the demo's held-out task ({16 if args.smoke else 300} queries); third-party: {described}")
    print("ratio: nDCG@10 / the same model's float32 full-width nDCG@10 (the peer, measured in this run)\n")
    header = (f"| {'vectors':<22} | bytes/vector | stdlib plain | stdlib MRL | ratio plain | ratio MRL "
              f"| 3rd-party plain | 3rd-party MRL | ratio plain | ratio MRL |")
    print(header)
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(header.count("|") - 1)) + "|")
    for label, _ in settings(args.smoke):
        cells = [f"{results[(label, 'plain', 'stdlib')][1]:,}"]
        for task in ("stdlib", "third-party"):
            plain, mrl = results[(label, "plain", task)][0], results[(label, "matryoshka", task)][0]
            base_plain = results[("float32", "plain", task)][0]
            base_mrl = results[("float32", "matryoshka", task)][0]
            cells += [f"{plain:.4f}", f"{mrl:.4f}", f"{plain / base_plain:.2f}", f"{mrl / base_mrl:.2f}"]
        print(f"| {label:<22} | " + " | ".join(cells) + " |")

    print(f"\ncorpus mode (`diffembed encode ... -o DIR/ --precision P`): {documents} documents of the demo task, "
          "the Matryoshka model, parquet shards (ids included)\n")
    print("| precision | bytes/vector | shard bytes | ratio to float32 |")
    print("|---|---:|---:|---:|")
    for precision, per_vector, total in sizes:
        print(f"| {precision} | {per_vector:,} | {total:,} | {total / sizes[0][2]:.3f} |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s; work folder {work}")


if __name__ == "__main__":
    main()
