"""Corpus encoding under torchrun (two CPU ranks, gloo), after SIGKILL, and on a 200,000-row corpus.

The killed runs launch this file as a script (`python tests/corpus/test_corpus_distributed.py MODE.json ARGS...`):
it runs `diffembed encode ARGS` with a hook that SIGKILLs the process at a chosen point.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers.corpus import MODEL, WORDS, corpus_rows, read_output, write_jsonl
from helpers.processes import launch

from diffembed_hf.corpus import encode_corpus

pytestmark = pytest.mark.slow  # torchrun / Ray / the whole demo: run by CI, skipped by `-m "not slow"`


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders(**MODEL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_write_what_one_process_writes(folder, tmp_path, one_thread):
    rows = corpus_rows(3000, seed=2)
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    single = encode_corpus(str(folder), source, tmp_path / "single", shard_size=400, title_field="title", device="cpu")
    assert single.computed == list(range(8))

    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    ranks = tmp_path / "ranks"
    # `python -m diffembed_hf` under torchrun, with -v so that each rank logs its share
    result = launch([*torchrun, "-m", "diffembed_hf", "-v", "encode", str(folder), "-i", str(source), "-o", f"{ranks}/",
                     "--shard-size", "400", "--title-field", "title"])
    assert result.returncode == 0, result.stdout[-5000:]
    # each rank computed its own four shards (k % 2), rank 0 wrote the manifest once both were done
    assert "rank 0: 4 of its 4 shards to compute" in result.stdout
    assert "rank 1: 4 of its 4 shards to compute" in result.stdout
    assert "3000 embeddings in 8 shards (8 computed now, 0 kept" in result.stdout

    single_ids, single_vectors = read_output(tmp_path / "single")
    ids, vectors = read_output(ranks)
    assert ids == single_ids == [r["_id"] for r in rows]  # every input row exactly once, in input order
    np.testing.assert_allclose(vectors, single_vectors, rtol=0, atol=1e-5)
    single_manifest = json.loads((tmp_path / "single" / ".diffembed-manifest.json").read_text())
    manifest = json.loads((ranks / ".diffembed-manifest.json").read_text())
    assert manifest["complete"] and manifest["rows"] == 3000
    assert [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in single_manifest["shards"]]


# --- SIGKILL in the middle of a shard (one torchrun rank), and while a shard is being written ------------------------

def _run_with_hook(mode: dict, args: list[str]):
    """The script side: run the CLI with a hook that SIGKILLs this process where `mode` says."""
    import pyarrow.parquet as parquet

    from diffembed_hf.cli import main
    from diffembed_hf.packed_encoder import PackedEncoder
    from diffembed_hf.corpus.job import CorpusJob

    state = {"shard": None, "batches": 0}
    compute, forward, write_table = CorpusJob.compute, PackedEncoder._forward, parquet.write_table
    me = int(os.environ.get("RANK", "0")) == mode.get("rank", 0)

    def recording_compute(self, shard, encoder, progress=None):
        state.update(shard=shard, batches=0)
        return compute(self, shard, encoder, progress)

    def killing_forward(self, rows):
        state["batches"] += 1
        if me and state["shard"] == mode.get("kill_in_shard") and state["batches"] == 3:
            os.kill(os.getpid(), signal.SIGKILL)  # in the middle of the shard: 2 batches embedded, more to go
        return forward(self, rows)

    def killing_write_table(table, where, **kwargs):
        write_table(table, where, **kwargs)
        if me and mode.get("kill_writing"):
            os.truncate(where, os.path.getsize(where) // 2)  # the temporary file is half written when the process dies
            os.kill(os.getpid(), signal.SIGKILL)

    CorpusJob.compute, PackedEncoder._forward = recording_compute, killing_forward
    parquet.write_table = killing_write_table
    sys.exit(main(args))


def _shards(out: Path) -> dict[str, int]:
    """Every shard under its final name, each of which must read completely: name -> rows."""
    return {p.name: pq.read_table(p).num_rows for p in sorted(out.glob("part-*.parquet"))}


def _expected_rows(shard: str) -> int:
    return 200 if shard == "part-00005.parquet" else 400  # 2,200 rows in shards of 400


def test_killed_runs_resume_to_the_uninterrupted_output(folder, tmp_path, one_thread):
    rows = corpus_rows(2200, seed=3)
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    out = tmp_path / "out"
    args = ["encode", str(folder), "-i", str(source), "-o", f"{out}/", "--shard-size", "400",
            "--max-tokens-per-batch", "1500", "--no-progress"]

    def killed(mode, torchrun=()):
        (tmp_path / "mode.json").write_text(json.dumps(mode))
        return launch([*torchrun, __file__, str(tmp_path / "mode.json"), *args])

    # 1. torchrun, 2 ranks: rank 1 (shards 1, 3, 5) is SIGKILLed in the middle of shard 3; torchrun then stops rank 0
    torchrun = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(_free_port())]
    first = killed({"rank": 1, "kill_in_shard": 3}, torchrun)
    assert first.returncode != 0 and "Signal 9 (SIGKILL)" in first.stdout, first.stdout[-3000:]
    done = _shards(out)
    assert "part-00001.parquet" in done and "part-00003.parquet" not in done
    assert all(rows_ == _expected_rows(name) for name, rows_ in done.items())  # nothing partial under a final name
    assert not json.loads((out / ".diffembed-manifest.json").read_text())["complete"]
    kept = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("part-*")}

    # 2. one process, SIGKILLed while writing the first shard it computes: that shard stays under a temporary name
    second = killed({"kill_writing": True})
    assert second.returncode == -signal.SIGKILL, second.stdout[-3000:]
    assert _shards(out) == done
    assert len(list(out.glob(".part-*.parquet.partial-*"))) == 1

    # 3. the same command again: only the unfinished shards are computed
    from diffembed_hf.corpus import encode_corpus as run

    result = run(str(folder), source, out, shard_size=400, max_tokens_per_batch=1500, device="cpu")
    assert result.computed == [k for k in range(6) if f"part-0000{k}.parquet" not in done] and 3 in result.computed
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("part-*") if p.name in kept} == kept
    assert not list(out.glob(".part-*"))
    assert _shards(out) == {f"part-0000{k}.parquet": _expected_rows(f"part-0000{k}.parquet") for k in range(6)}

    straight = tmp_path / "straight"
    run(str(folder), source, straight, shard_size=400, max_tokens_per_batch=1500, device="cpu")
    (ids, vectors), (straight_ids, straight_vectors) = read_output(out), read_output(straight)
    assert ids == straight_ids == [r["_id"] for r in rows]
    np.testing.assert_allclose(vectors, straight_vectors, rtol=0, atol=1e-5)
    manifest, reference = (json.loads((d / ".diffembed-manifest.json").read_text()) for d in (out, straight))
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in reference["shards"]]


# --- memory on a 200,000-row corpus -------------------------------------------------------------------------------

PEAK_RSS = textwrap.dedent(
    """
    import sys
    from diffembed_hf.cli import main
    code = main(sys.argv[1:])
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("PEAK_MB", int(line.split()[1]) / 1024)
    sys.exit(code)
    """
)


def _generated(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            handle.write(json.dumps({"_id": f"row-{i:07d}", "text": f"{WORDS[i % 41]} {WORDS[i * 7 % 43]} number {i}"})
                         + "\n")
    return path


def test_peak_memory_is_set_by_the_shard_size_not_the_corpus_size(folder, tmp_path):
    """200,000 rows vs 2,000 rows (one shard) in the same pipeline: the peak RSS may grow by the scan's 8 bytes per
    row (1.6 MB) plus allocator noise, well under the 40 MB bound; a reader that held the corpus would hold its
    200,000 texts, ids, token ids and vectors (> 100 MB here)."""
    peaks = {}
    for n in (2_000, 200_000):
        source = _generated(tmp_path / f"rows{n}.jsonl", n)
        result = launch(["-c", PEAK_RSS, "encode", str(folder), "-i", str(source), "-o", f"{tmp_path / str(n)}/",
                         "--shard-size", "2000", "--no-progress"], timeout=600)
        assert result.returncode == 0, result.stdout[-3000:]
        peaks[n] = float(result.stdout.split("PEAK_MB")[1].split()[0])
        assert json.loads((tmp_path / str(n) / ".diffembed-manifest.json").read_text())["rows"] == n
    print(f"peak RSS: {peaks[2_000]:.0f} MB for 2,000 rows, {peaks[200_000]:.0f} MB for 200,000 rows (shard 2,000)")
    assert peaks[200_000] - peaks[2_000] < 40, peaks


if __name__ == "__main__":  # python tests/corpus/test_corpus_distributed.py MODE.json encode ...
    _run_with_hook(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2:])
