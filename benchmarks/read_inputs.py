"""Reading corpora: the shared reader (`diffembed_hf.readers` under `corpus.read.iter_rows`, every row checked)
against the bare standard-library loop that any reader must at least run, in the same run.

Three inputs of the same rows (generated texts of 5-150 words, `_id` + `text`): `.jsonl`, `.csv` and
`.jsonl.gz`. Peers: `readline` + `json.loads` per line, `csv.DictReader`, and `gzip.open` + `readline` +
`json.loads`, each one pass with no checks. For the compressed file the corpus is read shard by shard as corpus
mode computes it (each shard from its start position), with the open stream kept between shards (what the
reader does) and with it dropped after every shard (every shard decompressing from the start of the file,
what a reader without it would do). Medians of `--repeats` runs; no model is involved.

    python benchmarks/read_inputs.py            # about a minute on 2 idle cores
    python benchmarks/read_inputs.py --smoke    # smoke test of the script: 500 rows in shards of 100, one run
"""

import argparse
import csv
import gzip
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from diffembed_hf import readers
from diffembed_hf.corpus.read import CorpusSource, iter_rows, scan

WORDS = ("the of and to in is for on that with as by this from at are be or an it which have not was but all "
         "embedding model corpus shard retrieval passage query vector token attention layer naïve 日本").split()


def write_inputs(folder: Path, rows: int) -> dict[str, Path]:
    rng = random.Random(0)
    records = [{"_id": f"doc-{i}", "text": " ".join(rng.choices(WORDS, k=rng.randint(5, 150)))} for i in range(rows)]
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    (folder / "c.jsonl").write_bytes(data)
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(data, compresslevel=6))
    with open(folder / "c.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["_id", "text"])
        writer.writeheader()
        writer.writerows(records)
    return {kind: folder / f"c.{kind}" for kind in ("jsonl", "csv", "jsonl.gz")}


def median_time(function, repeats: int) -> tuple[float, int]:
    """(median seconds, rows read)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), rows


def ours(path: Path) -> int:
    return sum(row.problem is None for row in iter_rows(CorpusSource(str(path))))


def by_shards(path: Path, shard_size: int, keep: bool) -> int:
    """Every shard read from its start position, as `CorpusJob.compute` reads it."""
    source = CorpusSource(str(path))
    plan = scan(source, shard_size)
    count = 0
    for position, index in plan.starts:
        rows = iter_rows(source, position, index)
        for row in rows:
            count += 1
            if row.index + 1 >= index + shard_size:
                break
        rows.close()
        if not keep:
            for handle, _ in readers._kept.values():
                handle.close()
            readers._kept.clear()
    return count


def stdlib_jsonl(path: Path, opener=open) -> int:
    count = 0
    with opener(path, "rb") as handle:
        for line in handle:
            if line.strip():
                json.loads(line)
                count += 1
    return count


def stdlib_csv(path: Path) -> int:
    with open(path, newline="", encoding="utf-8") as handle:
        return sum(1 for _ in csv.DictReader(handle))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="smoke test of the script: 500 rows, shards of 100, "
                        "one run (overrides the options); no figure is a measurement")
    args = parser.parse_args()
    if args.smoke:
        args.rows, args.shard_size, args.repeats = 500, 100, 1
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_inputs(Path(tmp), args.rows)
        shards = -(-args.rows // args.shard_size)
        lines = [
            ("jsonl, one pass", lambda: ours(paths["jsonl"]), "readline + json.loads",
             lambda: stdlib_jsonl(paths["jsonl"])),
            ("csv, one pass", lambda: ours(paths["csv"]), "csv.DictReader", lambda: stdlib_csv(paths["csv"])),
            ("jsonl.gz, one pass", lambda: ours(paths["jsonl.gz"]), "gzip + readline + json.loads",
             lambda: stdlib_jsonl(paths["jsonl.gz"], gzip.open)),
            (f"jsonl.gz, scan + {shards} shards, stream kept", lambda: by_shards(paths["jsonl.gz"], args.shard_size,
                                                                                True),
             "the same, stream dropped per shard", lambda: by_shards(paths["jsonl.gz"], args.shard_size, False)),
        ]
        print(f"{args.rows} rows; medians of {args.repeats} runs")
        print(f"{'ours':48} {'s':>7}   {'peer':36} {'s':>7}  ours/peer")
        for name, function, peer_name, peer in lines:
            (ours_s, rows), (peer_s, peer_rows) = median_time(function, args.repeats), median_time(peer, args.repeats)
            assert rows == peer_rows == args.rows  # both read every row
            print(f"{name:48} {ours_s:7.2f}   {peer_name:36} {peer_s:7.2f}  {ours_s / peer_s:6.2f}")


if __name__ == "__main__":
    main()
