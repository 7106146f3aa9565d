"""Shared by the corpus tests: the spec of their tiny DiffEmbed folder (real Dream tokenizer) and generated corpora."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

WORDS = ("apple bridge candle desert engine forest garden harbor island jungle kettle ladder mirror needle ocean "
         "pepper quartz river saddle tunnel umbrella valley window yellow zipper anchor basket cactus dragon "
         "feather glacier hammer igloo jacket kitten lemon magnet nickel orchid parrot 短い文 émigré naïve"
         ).split()
MAX_LEN = 96  # the folder's max_seq_length: the longest generated texts are truncated
MODEL = dict(seed=5, max_seq_length=MAX_LEN)  # `tiny_folders(**MODEL)` (conftest): hidden size 64


def corpus_rows(n: int, seed: int = 0) -> list[dict]:
    """n rows of mixed lengths (1 to ~150 words, so a few exceed MAX_LEN tokens), unique ids, some titles."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choice((1, 2, 5, 10, 20, 40, 80, 150))
        row = {"_id": f"doc-{i:06d}", "text": " ".join(rng.choices(WORDS, k=words))}
        row["title"] = " ".join(rng.choices(WORDS, k=2)) if i % 3 else ""
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_output(folder: Path) -> tuple[list[str], np.ndarray]:
    """ids and vectors of every shard, in shard order (what a user reads with pyarrow)."""
    import pyarrow.parquet as pq

    ids, vectors = [], []
    for path in sorted(Path(folder).glob("part-*.parquet")):
        table = pq.read_table(path)
        ids += table.column("id").to_pylist()
        vectors.append(np.asarray(table.column("embedding").combine_chunks().flatten()).reshape(len(table), -1))
    return ids, np.concatenate(vectors).astype(np.float32)
