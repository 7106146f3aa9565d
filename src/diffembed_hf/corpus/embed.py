"""`embed_texts`: a list of texts in, one float32 vector per text out, in one process or one per device.

This is the entry point for callers that hold their corpus in memory (evaluation corpora): it runs the
packed, length-sorted encoder (`encoding.encode`), and with `devices=[...]` (or `"all"`) it spreads the texts
over one worker process per device (torch.multiprocessing, spawned), each holding its own copy of the model.
"""

from __future__ import annotations

import logging
import os
import queue
import traceback
from collections.abc import Sequence

import numpy as np
import torch
import torch.multiprocessing as mp
from sentence_transformers import SentenceTransformer

from ..packed_encoder import DEFAULT_MAX_TOKENS_PER_BATCH, check_texts, progress_bar
from ..encoding import encode, load_encoder

logger = logging.getLogger(__name__)


def visible_devices() -> list[str]:
    """Every visible CUDA device, or `["cpu"]`."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]


def embed_texts(
    model: SentenceTransformer | str,
    texts: Sequence[str],
    *,
    prompt: str | None = None,
    prompt_name: str | None = None,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    max_seq_length: int | None = None,
    show_progress_bar: bool | None = None,
    devices: Sequence[str] | str | None = None,
) -> np.ndarray:
    """Embed `texts`: float32 `[len(texts), dim]`, row i for texts[i], equal to what
    `SentenceTransformer(folder, trust_remote_code=True).encode(texts, prompt=prompt)` returns.

    `model`: a loaded `SentenceTransformer` (e.g. `encoding.load_encoder(...)`) or a folder / Hub id.
    `devices`: None runs in this process on the model's device; a list (`["cuda:0", "cuda:1"]`, or `"all"` for
    every visible GPU) runs one spawned worker process per entry, which then needs `model` as a folder or Hub id.
    The vectors are full-width float32 whatever `model.truncate_dim` says; `compact.Compaction(...).apply` makes
    them compact (`encoding.encode` and corpus mode do it for you).
    """
    texts = check_texts(texts)
    if devices == "all":
        devices = visible_devices()
    if devices is not None and len(devices) > 1:
        if not isinstance(model, str):
            raise TypeError("with several devices pass the model as a folder or Hub id: each device's process loads it")
        return _embed_on_devices(model, texts, list(devices), prompt=prompt, prompt_name=prompt_name,
                                 max_tokens_per_batch=max_tokens_per_batch, max_seq_length=max_seq_length,
                                 show_progress_bar=show_progress_bar)
    if isinstance(model, str):
        model = load_encoder(model, device=devices[0] if devices else None, max_seq_length=max_seq_length)
    else:
        if devices:
            model.to(devices[0])
        if max_seq_length is not None:
            model.max_seq_length = max_seq_length
    return encode(model, texts, prompt=prompt, prompt_name=prompt_name, max_tokens_per_batch=max_tokens_per_batch,
                  show_progress_bar=show_progress_bar)


def _worker(rank: int, device: str, model: str, texts: list[str], options: dict, results) -> None:
    try:
        if device == "cpu":  # share the cores between the CPU workers instead of oversubscribing them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // options.pop("num_workers")))
        else:
            options.pop("num_workers")
        results.put((rank, embed_texts(model, texts, devices=[device], show_progress_bar=False, **options)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with the worker's traceback
        results.put((rank, traceback.format_exc()))


def _embed_on_devices(model: str, texts: list[str], devices: list[str], **options) -> np.ndarray:
    """Deal the texts round-robin (so every device gets a similar length mix), one spawned process per device."""
    context = mp.get_context("spawn")
    results = context.Queue()
    show = options.pop("show_progress_bar")
    parts = [texts[i::len(devices)] for i in range(len(devices))]
    options["num_workers"] = len(devices)
    workers = [context.Process(target=_worker, args=(i, device, model, parts[i], dict(options), results), daemon=True)
               for i, device in enumerate(devices)]
    for worker in workers:
        worker.start()
    progress = progress_bar(len(texts), show)
    outputs: dict[int, np.ndarray] = {}
    try:
        while len(outputs) < len(workers):
            try:
                rank, result = results.get(timeout=5)
            except queue.Empty:
                dead = [i for i, w in enumerate(workers) if i not in outputs and w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"the worker on {devices[dead[0]]} died (exit code {workers[dead[0]].exitcode})")
                continue
            if isinstance(result, str):
                raise RuntimeError(f"the worker on {devices[rank]} failed:\n{result}")
            outputs[rank] = result
            if progress is not None:
                progress.update(len(result))
    finally:
        if progress is not None:
            progress.close()
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    dim = next(iter(outputs.values())).shape[1]
    embeddings = np.empty((len(texts), dim), dtype=np.float32)
    for i, part in outputs.items():
        embeddings[i::len(devices)] = part
    return embeddings
