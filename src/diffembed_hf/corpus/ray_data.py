"""Ray Data (extra `[ray]`): embed a `ray.data.Dataset`, or a corpus into the same shard folder as the other modes.

Everything that schedules, retries and moves data is Ray's: `map_batches` with a callable class on an actor
pool (`compute=ray.data.ActorPoolStrategy(size=N)`), one GPU per actor where the cluster has GPUs, one CPU
per actor otherwise. For the shard folder the unit of work is a shard: an actor reads shard k's rows from its
start position, embeds them and writes `part-k` itself, so the input and the output folder must be on storage
that every node sees (as with torchrun across machines); the driver writes the manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..encoding import load_encoder
from .batching import DEFAULT_MAX_TOKENS_PER_BATCH, Encoder, warn_truncated
from .embed import resolve_prompt
from ..compact import DEFAULT_CALIBRATION_ROWS, CalibrationRanges
from .encode import (DEFAULT_SHARD_SIZE, CorpusJob, CorpusResult, check_calibration_rows, as_source, check_options,
                     plan_job, resolve_precision)
from .read import CorpusError, CorpusSource
from .shards import ShardInfo, finish_manifest

logger = logging.getLogger(__name__)


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise CorpusError("Ray mode needs Ray Data: pip install 'diffembed-hf[ray]'") from err
    return ray


def _load(model: str, prompt: str | None, prompt_name: str | None, max_tokens_per_batch: int,
          max_seq_length: int | None):
    """The model on this actor's device: its GPU (Ray sets CUDA_VISIBLE_DEVICES), else one CPU thread, the one
    CPU the actor reserved."""
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    st_model = load_encoder(model, max_seq_length=max_seq_length)
    return st_model, Encoder(st_model, prompt=resolve_prompt(st_model, prompt, prompt_name),
                             max_tokens_per_batch=max_tokens_per_batch)


class TextEmbedder:
    """`map_batches` callable: adds an `embedding` column (fixed-size list of float32) to a pyarrow batch."""

    def __init__(self, model: str, text_column: str, **options):
        self.text_column = text_column
        self.encoder = _load(model, **options)[1]

    def __call__(self, batch):
        import pyarrow as pa

        texts = batch.column(self.text_column).to_pylist()
        bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
        if bad is not None:
            raise CorpusError(f"column {self.text_column!r} holds {type(texts[bad]).__name__} ({texts[bad]!r:.60}), "
                              "expected a string")
        embeddings, _ = self.encoder.embed(texts)
        column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), embeddings.shape[1])
        return batch.append_column("embedding", column)


class ShardWriter:
    """`map_batches` callable for the shard folder: each input row is a shard number; writes that shard."""

    def __init__(self, model: str, job: CorpusJob, **options):
        self.job = job
        self.encoder = _load(model, **options)[1]

    def __call__(self, batch: dict) -> dict:
        infos = [self.job.compute(int(k), self.encoder) for k in batch["shard"]]
        return {"shard": np.array([i.index for i in infos]), "rows": np.array([i.rows for i in infos]),
                "sha256": np.array([i.sha256 for i in infos]), "truncated": np.array([i.truncated for i in infos])}


def _pool(num_actors: int | None, work_items: int | None = None) -> tuple[Any, dict]:
    """Ray's actor pool: one actor per GPU of the cluster (or `num_actors`), else one per CPU."""
    ray = _ray()
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    size = num_actors or gpus or int(resources.get("CPU", 1))
    if work_items is not None:
        size = max(1, min(size, work_items))
    return ray.data.ActorPoolStrategy(size=size), ({"num_gpus": 1} if gpus else {"num_cpus": 1})


def embed_dataset(dataset, model: str, *, text_column: str = "text", prompt: str | None = None,
                  prompt_name: str | None = None, max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
                  max_seq_length: int | None = None, batch_size: int = 1024, num_actors: int | None = None):
    """`dataset` (a `ray.data.Dataset` with a string column `text_column`) with an `embedding` column added,
    computed lazily by an actor pool of DiffEmbed models (`model`: a folder or Hub id every node can load)."""
    compute, resources = _pool(num_actors)
    return dataset.map_batches(
        TextEmbedder, fn_constructor_kwargs=dict(model=model, text_column=text_column, prompt=prompt,
                                                 prompt_name=prompt_name, max_tokens_per_batch=max_tokens_per_batch,
                                                 max_seq_length=max_seq_length),
        batch_size=batch_size, batch_format="pyarrow", compute=compute, **resources)


def _plan_remote(model: str, source, output_dir: Path, options: dict, job_options: dict):
    """Run on a worker of the pool's kind (so the compute dtype is the actors'): read the corpus, open the folder."""
    try:
        st_model, encoder = _load(model, **options)
        job = plan_job(model, st_model, encoder, source, output_dir, **job_options)
        kept = {k: job.verified(k) for k in range(job.plan.num_shards)}
        return job, {k: info for k, info in kept.items() if info is not None}, None
    except CorpusError as err:
        return None, None, str(err)


def encode_corpus_with_ray(
    model: str,
    source: str | CorpusSource,
    output_dir: str | Path,
    *,
    address: str,
    field: str = "text",
    id_field: str | None = None,
    title_field: str | None = None,
    split: str | None = None,
    subset: str | None = None,
    prompt: str | None = None,
    prompt_name: str | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dtype: str = "float32",
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    max_seq_length: int | None = None,
    skip_bad_rows: bool = False,
    overwrite: bool = False,
    show_progress_bar: bool | None = None,
    num_actors: int | None = None,
    truncate_dim: int | None = None,
    precision: str | None = None,
    calibration: CalibrationRanges | None = None,
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS,
) -> CorpusResult:
    """`encode_corpus` on the Ray cluster at `address` ("auto", "host:port", or "local" for a new local
    instance): the same shards, manifest, resume and refusals, with shards spread over Ray's actor pool."""
    dtype = resolve_precision(dtype, precision)
    check_options(shard_size, dtype, max_tokens_per_batch)
    check_calibration_rows(calibration_rows)
    ray = _ray()
    source = as_source(source, field, id_field, title_field, split, subset)
    output_dir = Path(output_dir).absolute()
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress_bar is not False
    options = dict(prompt=prompt, prompt_name=prompt_name, max_tokens_per_batch=max_tokens_per_batch,
                   max_seq_length=max_seq_length)
    _, resources = _pool(num_actors)
    planner = ray.remote(_plan_remote).options(**resources)
    job, kept, error = ray.get(planner.remote(model, source, output_dir, options, dict(
        shard_size=shard_size, dtype=dtype, skip_bad_rows=skip_bad_rows, overwrite=overwrite, truncate_dim=truncate_dim,
        calibration=calibration, calibration_rows=calibration_rows)))
    if error is not None:
        raise CorpusError(error)
    pending = [k for k in range(job.plan.num_shards) if k not in kept]
    infos = list(kept.values())
    if pending:
        compute, resources = _pool(num_actors, len(pending))
        shards = ray.data.from_items([{"shard": k} for k in pending], override_num_blocks=len(pending))
        written = shards.map_batches(ShardWriter, fn_constructor_kwargs=dict(model=model, job=job, **options),
                                     batch_size=1, compute=compute, **resources)
        for row in written.iter_rows():
            infos.append(ShardInfo(int(row["shard"]), int(row["rows"]), str(row["sha256"]), computed=True,
                                   truncated=int(row["truncated"])))
        computed = [i for i in infos if i.computed]
        warn_truncated(sum(i.truncated for i in computed), sum(i.rows for i in computed),
                       job.settings["max_seq_length"])
    from .. import __version__

    manifest = finish_manifest(output_dir, job.settings, infos, skipped=job.plan.skipped,
                               skipped_examples=job.plan.skipped_examples,
                               extra={**job.manifest_fields(), "created_by": f"diffembed-hf {__version__} (Ray)"})
    return CorpusResult(output_dir, sum(i.rows for i in infos), job.plan.num_shards,
                        sorted(i.index for i in infos if i.computed), job.plan.skipped, manifest)
