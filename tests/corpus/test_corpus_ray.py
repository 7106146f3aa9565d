"""Ray Data: a local Ray instance started by this test on 127.0.0.1 with 2 CPUs (so 2 single-CPU actors)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import ray
from helpers.corpus import MODEL, corpus_rows, read_output, write_jsonl
from helpers.processes import clean_env, launch

from diffembed_hf.corpus import embed_dataset, embed_texts, encode_corpus, join_title
from diffembed_hf.encoding import load_encoder

pytestmark = pytest.mark.slow  # torchrun / Ray / the whole demo: run by CI, skipped by `-m "not slow"`


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders(**MODEL)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head on 127.0.0.1 with 2 CPUs, owned by this test process: shut down (all of it) at the end."""
    env = clean_env()
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the workers Ray starts inherit this environment (one thread each, offline)
    context = ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_ray_cli_writes_what_one_process_writes(folder, cluster, tmp_path, one_thread):
    rows = corpus_rows(3000, seed=2)
    source = write_jsonl(tmp_path / "corpus.jsonl", rows)
    single = tmp_path / "single"
    encode_corpus(str(folder), source, single, shard_size=400, title_field="title", device="cpu")

    out = tmp_path / "ray"
    result = launch(["-m", "diffembed_hf", "encode", str(folder), "-i", str(source), "-o", f"{out}/", "--shard-size",
                     "400", "--title-field", "title", "--ray", cluster, "--no-progress"], timeout=400)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "3000 embeddings in 8 shards (8 computed now, 0 kept" in result.stdout
    ids, vectors = read_output(out)
    single_ids, single_vectors = read_output(single)
    assert ids == single_ids == [r["_id"] for r in rows]  # every input row exactly once, same shard layout
    np.testing.assert_allclose(vectors, single_vectors, rtol=0, atol=1e-5)
    manifest, reference = (json.loads((d / ".diffembed-manifest.json").read_text()) for d in (out, single))
    assert manifest["complete"] and [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in reference["shards"]]
    assert manifest["settings"] == reference["settings"]  # the same run, whichever engine computed it

    # The same folder is the same job for every engine: one process resumes what Ray wrote (nothing to do).
    again = encode_corpus(str(folder), source, out, shard_size=400, title_field="title", device="cpu")
    assert again.computed == []


def test_embed_dataset_adds_an_embedding_column(folder, cluster, one_thread):
    rows = corpus_rows(500, seed=4)
    texts = [join_title(r["title"], r["text"]) for r in rows]
    dataset = ray.data.from_items([{"id": r["_id"], "text": t} for r, t in zip(rows, texts)])
    embedded = embed_dataset(dataset, str(folder), batch_size=128, num_actors=2, prompt_name="query")
    got = embedded.to_pandas()
    assert list(got.columns) == ["id", "text", "embedding"]
    by_id = dict(zip(got["id"], np.stack(got["embedding"].to_numpy())))
    assert sorted(by_id) == sorted(r["_id"] for r in rows)
    expected = embed_texts(load_encoder(str(folder), device="cpu"), texts, prompt_name="query")
    np.testing.assert_allclose(np.stack([by_id[r["_id"]] for r in rows]), expected, rtol=0, atol=1e-5)
