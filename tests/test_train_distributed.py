"""`train()` under torchrun (two CPU processes, gloo) and after a crash (resume from the last checkpoint).

1. Two-process DDP: every rank scores its own queries against the documents of *both* ranks (the similarity
   matrix has world_size x per-rank-batch x (1 + negatives) columns), and training with per-device batch B on
   two ranks gives the same losses, gradient norms and final weights as one process with batch 2B.
2. Resume: a run SIGKILLed after a checkpoint, restarted with `resume=True`, sees the same batches in the same
   order and ends at the same weights as an uninterrupted run.

Both launch this file as a script (`python tests/test_train_distributed.py JOB.json`, under torchrun for DDP):
the worker below runs `train()` with a recorder around the loss and writes what it saw to JSON-lines files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# torchrun: run by CI (on the oldest versions too), skipped by `-m "not slow"`
pytestmark = [pytest.mark.slow, pytest.mark.versions]

B = 4  # per-device batch size
WORLD = 2  # torchrun processes
NEGATIVES = 1  # hard negatives per row (one `negative` column)
WORDS = ("apple bridge candle desert engine forest garden harbor island jungle kettle ladder mirror needle ocean "
         "pepper quartz river saddle tunnel umbrella valley window yellow zipper anchor basket cactus dragon "
         "feather glacier hammer igloo jacket kitten lemon magnet nickel orchid parrot").split()


# --- the worker: runs train() with recorders; used by the tests in-process and as a launched script ---------

def _append(path, record) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _read(path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


@contextlib.contextmanager
def _recording_loss(record_path):
    """Make train()'s loss write, per call, the anchor token ids of its batch and the shape of the score matrix
    its `similarity_fct` returns (the queries x gathered documents matrix that InfoNCE normalises over)."""
    import diffembed_hf.train as train_module

    original = train_module._make_loss
    rank = int(os.environ.get("RANK", "0"))

    def make_loss(model, config):
        loss = original(model, config)
        similarity, forward = loss.similarity_fct, loss.forward

        def recording_similarity(a, b):
            scores = similarity(a, b)
            _append(record_path, {"rank": rank, "scores": list(scores.shape)})
            return scores

        def recording_forward(sentence_features, labels):
            anchors = sentence_features[0]
            ids = [row[mask.bool()].tolist() for row, mask in zip(anchors["input_ids"], anchors["attention_mask"])]
            _append(record_path, {"rank": rank, "anchors": ids})
            return forward(sentence_features, labels)

        loss.similarity_fct = recording_similarity
        loss.forward = recording_forward
        return loss

    train_module._make_loss = make_loss
    try:
        yield
    finally:
        train_module._make_loss = original


def _callbacks(record_path, kill_at_step=None):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                _append(record_path, {"step": state.global_step, "loss": logs["loss"], "grad_norm": logs["grad_norm"]})

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at_step:  # checkpoint-(kill_at_step - 1) is on disk by now
                os.kill(os.getpid(), signal.SIGKILL)

    return [Recorder()]


def run_job(job: dict):
    from diffembed_hf.train import TrainingConfig, train

    record = job["record"].format(rank=os.environ.get("RANK", "0"))
    # One thread per process, as torchrun gives its workers: on 2 cores, two threads whose partner core is busy
    # spin in OpenMP barriers and make this tiny model train 10x slower; it also makes every run add up alike.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _recording_loss(record):
            return train(job["base"], job["data"], job["out"], TrainingConfig(**job["config"]), resume=job["resume"],
                         callbacks=_callbacks(record, job.get("kill_at_step")))
    finally:
        torch.set_num_threads(threads)


# --- helpers for the tests -------------------------------------------------------------------------------------

def _config(**overrides) -> dict:
    from diffembed_hf.train import TrainingConfig

    config = TrainingConfig(
        batch_size=B, max_seq_length=64, learning_rate=1e-3, warmup_steps=0, eval_fraction=0.0, save_steps=10_000,
        logging_steps=1, seed=1234, query_prompt="", gradient_checkpointing=True,
        bf16=False,  # fp32 on every CPU: an AMX CPU's default bf16 autocast rounds the two runs' sums differently
    )
    return dataclasses.asdict(dataclasses.replace(config, **overrides))


def _job(tmp, name, base, data, config, resume=False, kill_at_step=None) -> dict:
    return dict(base=str(base), data=str(data), out=str(tmp / name), config=config, resume=resume,
                kill_at_step=kill_at_step, record=str(tmp / f"{name}.rank{{rank}}.jsonl"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `python ARGS` in its own process group; on timeout the whole group (torchrun's workers too) dies."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"python {' '.join(args)} ran past {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def _run_script(tmp, job: dict, nproc: int = 1, timeout: float = 180) -> subprocess.CompletedProcess:
    job_file = tmp / f"{Path(job['out']).name}.job.json"
    job_file.write_text(json.dumps(job), encoding="utf-8")
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
                                      "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    return _launch([*launcher, __file__, str(job_file)], timeout)


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _max_update_difference(a: dict, b: dict, base: dict) -> tuple[float, float]:
    """max |a - b| over all weights, and the largest single-weight update b - base it is measured against."""
    assert a.keys() == b.keys() == base.keys()
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    update = max((b[k] - base[k]).abs().max().item() for k in a)
    return difference, update


def _steps(records) -> list[dict]:
    return [r for r in records if "loss" in r]


def _batches(records) -> list[list[list[int]]]:
    return [r["anchors"] for r in records if "anchors" in r]


@pytest.fixture(scope="module")
def base(tiny_folders):
    """A tiny randomly initialised DiffEmbed folder with the real Dream tokenizer."""
    return tiny_folders(weights="init")


def _write_rows(path: Path, n: int, seed: int) -> Path:
    """n (query, positive, negative) rows of word-overlap retrieval; every text is distinct, so the no-duplicates
    batch sampler never has to hold a row back."""
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        query = rng.sample(WORDS, 3)
        positive = query[:2] + rng.sample(WORDS, 4)
        negative = query[2:] + rng.sample(WORDS, 5)
        texts = [" ".join(query), " ".join(rng.sample(positive, 6)), " ".join(rng.sample(negative, 6))]
        if seen.isdisjoint(texts) and len(set(texts)) == 3:
            seen.update(texts)
            rows.append(dict(zip(("query", "positive", "negative"), texts)))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- 1. torchrun: gathered negatives, and equality with one process on the concatenated batch ---------------------

def test_ddp_two_ranks_gather_negatives_and_match_single_process_on_the_joint_batch(base, tmp_path):
    data = _write_rows(tmp_path / "rows.jsonl", WORLD * B, seed=0)
    steps = 2  # 2 epochs over the same 2B rows: every optimizer step sees all rows, whatever the sampler order
    ddp = _job(tmp_path, "ddp", base, data, _config(max_steps=steps, lora=False))
    single = _job(tmp_path, "single", base, data, _config(max_steps=steps, lora=False, batch_size=WORLD * B))

    run_job(single)  # in this process, no WORLD_SIZE: the reference (and it warms the remote-code module cache)
    started = time.perf_counter()
    result = _run_script(tmp_path, ddp, nproc=WORLD)
    assert result.returncode == 0, result.stdout[-6000:]
    print(f"torchrun x{WORLD}: {time.perf_counter() - started:.1f} s")

    records = {rank: _read(ddp["record"].format(rank=rank)) for rank in range(WORLD)}
    reference = _read(single["record"].format(rank=0))

    # Each rank scores its B queries against the positives and negatives of every rank, concatenated column by
    # column: [B, WORLD * B * (1 + NEGATIVES)]. Without the gather it would be [B, B * (1 + NEGATIVES)].
    for rank in range(WORLD):
        shapes = [r["scores"] for r in records[rank] if "scores" in r]
        assert shapes == [[B, WORLD * B * (1 + NEGATIVES)]] * steps, (rank, shapes)
    assert [r["scores"] for r in reference if "scores" in r] == [[WORLD * B, WORLD * B * (1 + NEGATIVES)]] * steps

    # Each step, the two ranks together saw exactly the rows the single process saw (as one batch).
    for step in range(steps):
        joint = sorted(_batches(records[0])[step] + _batches(records[1])[step])
        assert joint == sorted(_batches(reference)[step])
        assert len({tuple(x) for x in joint}) == WORLD * B

    # Why equal: rank r's loss is the mean over its B queries of the InfoNCE term against all 2B x (1 + negatives)
    # documents; `torch.distributed.nn.all_gather` sums the gradients flowing back to each rank's embeddings, and
    # DDP averages the two ranks' parameter gradients: (1/2) * sum_r (1/B) sum_{i in r} grad l_i = the gradient of
    # the mean over all 2B queries, i.e. of the single-process loss. The logged loss is the mean over ranks, the
    # same number. No x world_size factor: sentence-transformers' compute_loss replaces the Trainer's, so the
    # Trainer's `loss *= num_processes` (average_tokens_across_devices) never runs. The gradient norm is logged
    # before clipping, so a scale error in the gradients shows there although clipping and Adam (invariant to a
    # gradient's scale) would hide it from the weights.
    ddp_steps, single_steps = _steps(records[0]), _steps(reference)
    assert [s["step"] for s in ddp_steps] == [s["step"] for s in single_steps] == list(range(1, steps + 1))
    for d, s in zip(ddp_steps, single_steps):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-4), (d, s)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4), (d, s)

    # Final weights (full fine-tuning: every weight of the model, embeddings included). fp32, but the two runs add
    # up the same numbers in a different order (per-rank batches and padding, gloo all-reduce), so the gradients
    # agree to ~1e-6 relative. Adam's step g / (sqrt(v) + eps) is ~lr * sign(g) and so magnifies that rounding
    # only on the few weights whose gradient is near 0: observed max 3e-6 (on 3 of ~100k weights, all others
    # < 1e-6), against updates of up to 1.5e-3 (lr 1e-3, then 5e-4). A real difference in the gradient (e.g. no
    # gather: 3e-3) moves weights by ~lr; the bound, 1% of the largest update, lies between the two.
    initial, after_ddp, after_single = _weights(base), _weights(ddp["out"]), _weights(single["out"])
    difference, update = _max_update_difference(after_ddp, after_single, initial)
    print(f"max |ddp - single| = {difference:.3g}; largest update {update:.3g}")
    assert update > 0.5e-3  # training moved the weights (Adam: about lr per step)
    assert difference <= 1e-2 * update


# --- 2. resume after a crash ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resume_after_kill_matches_uninterrupted_run(base, tmp_path, lora):
    data = _write_rows(tmp_path / "rows.jsonl", 4 * B, seed=1)  # 4 batches per epoch: 6 steps cross an epoch
    # LoRA keeps its 0.05 dropout: after the resume the restored RNG state must give the same dropout masks.
    config = _config(max_steps=6, save_steps=3, lora=lora)
    straight = _job(tmp_path, "straight", base, data, config)
    resumed = _job(tmp_path, "resumed", base, data, config, kill_at_step=4)

    killed = _run_script(tmp_path, resumed)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-6000:]
    checkpoints = tmp_path / ".resumed.checkpoints"
    assert not Path(resumed["out"]).exists()  # no half-written model in the output folder
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-3", "diffembed_run.json"]  # + the run record
    # A LoRA checkpoint holds only the adapter (reloaded by train._Trainer._load_from_checkpoint), a full one the model.
    saved = {p.name for p in (checkpoints / "checkpoint-3").iterdir()}
    assert ("adapter_model.safetensors" in saved, "model.safetensors" in saved) == (lora, not lora), saved
    before_kill = _read(resumed["record"].format(rank=0))
    assert len(_batches(before_kill)) == 4  # steps 1-4 ran; step 4's update is lost with the process

    run_job(dict(resumed, kill_at_step=None, resume=True))
    run_job(straight)
    assert not checkpoints.exists()  # removed once the model is written

    records, reference = _read(resumed["record"].format(rank=0)), _read(straight["record"].format(rank=0))
    # Data order: steps 1-3 before the kill + steps 4-6 after the resume == the uninterrupted run's 6 batches
    # (the trainer skips the 3 batches already seen, then the sampler reshuffles epoch 2 from the same seed).
    batches = _batches(records)
    assert len(batches) == 4 + 3
    assert batches[:3] + batches[4:] == _batches(reference)
    assert _batches(reference)[4:] != _batches(reference)[:2]  # epoch 2 is reshuffled, so resuming must know it

    # Losses of the resumed steps 4-6 equal the uninterrupted run's (model, optimizer, scheduler and RNG restored).
    resumed_steps = [s for s in _steps(records) if s["step"] > 3]
    reference_steps = _steps(reference)
    assert [s["step"] for s in resumed_steps] == [4, 5, 6] and len(reference_steps) == 6
    for r, s in zip(resumed_steps, reference_steps[3:]):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-5), (r, s)

    # Same process layout (one process, same threads) and same arithmetic: equal to rounding.
    initial, after_resume, after_straight = _weights(base), _weights(resumed["out"]), _weights(straight["out"])
    difference, update = _max_update_difference(after_resume, after_straight, initial)
    print(f"lora={lora}: max |resumed - uninterrupted| = {difference:.3g}; largest update {update:.3g}")
    assert update > 1e-3
    assert difference <= 1e-3 * update


if __name__ == "__main__":  # python tests/test_train_distributed.py JOB.json (directly, or under torchrun)
    import logging

    logging.basicConfig(level=logging.WARNING)
    run_job(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))
