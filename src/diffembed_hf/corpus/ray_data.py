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

from .. import __version__
from ..packed_encoder import DEFAULT_MAX_TOKENS_PER_BATCH, warn_truncated
from ..errors import CorpusError, DiffembedError, require_extra
from .job import CorpusJob, CorpusResult, load, plan_job
from .read import CorpusSource
from .shards import ShardInfo, finish_manifest

logger = logging.getLogger(__name__)


def _ray():
    require_extra("ray", what="Ray mode")
    import ray
    import ray.data  # noqa: F401

    return ray


def _load(model: str, **options):
    """The model on this actor's device: its GPU (Ray sets CUDA_VISIBLE_DEVICES), else one CPU thread, the one
    CPU the actor reserved."""
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    return load(model, **options)


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
                                                 max_seq_length=max_seq_length, quantize=None,
                                                 trust_remote_code=False),
        batch_size=batch_size, batch_format="pyarrow", compute=compute, **resources)


def _plan_remote(model: str, source, output_dir: Path, options: dict, job_options: dict):
    """Run on a worker of the pool's kind (so the compute dtype is the actors'): read the corpus, open the folder."""
    try:
        st_model, encoder = _load(model, **options)
        job = plan_job(model, st_model, encoder, source, output_dir, **job_options)
        kept = {k: job.verified(k) for k in range(job.plan.num_shards)}
        return job, {k: info for k, info in kept.items() if info is not None}, None
    except DiffembedError as err:
        return None, None, err


def encode_on_ray(model: str, source: CorpusSource, output_dir: Path, *, address: str, options: dict,
                  job_options: dict, show_progress_bar: bool | None, num_actors: int | None) -> CorpusResult:
    """`corpus.encode_corpus(..., ray=ADDRESS)`, once its options are checked and the output locked: the same
    shards, manifest, resume and refusals, with shards spread over Ray's actor pool."""
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress_bar is not False
    _, resources = _pool(num_actors)
    planner = ray.remote(_plan_remote).options(**resources)
    job, kept, error = ray.get(planner.remote(model, source, output_dir, options, job_options))
    if error is not None:
        raise error
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
    manifest = finish_manifest(output_dir, job.settings, infos, skipped=job.plan.skipped,
                               skipped_examples=job.plan.skipped_examples,
                               extra={**job.manifest_fields(), "created_by": f"diffembed-hf {__version__} (Ray)"})
    return CorpusResult(output_dir, sum(i.rows for i in infos), job.plan.num_shards,
                        sorted(i.index for i in infos if i.computed), job.plan.skipped, manifest)
