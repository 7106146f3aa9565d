"""`encode_corpus`: a corpus of any size -> a folder of parquet shards and a manifest, resumable, on one
process or on every rank of a torchrun job.

Rank 0 reads the corpus once (validation, duplicate ids, shard boundaries, input digests) and checks the
output folder; every rank then computes the shards it owns (k % WORLD_SIZE), skipping those already complete,
and rank 0 writes the manifest once all ranks are done. Shard k is input rows [k * shard_size, (k+1) *
shard_size) whoever computes it, so the output never depends on the number of ranks.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from .. import __version__
from ..batching import DEFAULT_MAX_TOKENS_PER_BATCH, progress_bar, warn_truncated
from ..compact import DEFAULT_CALIBRATION_ROWS, PRECISIONS, CalibrationRanges, resolve_precision
from ..encoding import check_max_seq_length, check_prompt_name
from ..files import final_path, output_lock
from ..torchrun import torchrun_ranks
from . import distributed
from .job import CorpusResult, load, plan_job
from .read import CorpusError, CorpusSource, check_first_row
from .shards import finish_manifest

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000


def as_source(source, field, id_field, title_field, split, subset) -> CorpusSource:
    """A path, Hub id or `datasets` dataset, with the fields to read from it. A local path is made absolute, so
    `x.jsonl`, `./x.jsonl` and `/abs/x.jsonl` are the same input to a resumed run."""
    if isinstance(source, CorpusSource):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        name = str(path.resolve()) if path.exists() else str(source)
        return CorpusSource(name, field, id_field, title_field, split, subset)
    return CorpusSource("dataset", field, id_field, title_field, dataset=source)


def check_options(shard_size: int, dtype: str, max_tokens_per_batch: int) -> None:
    """Numeric and choice options, checked before any work."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise CorpusError(f"--shard-size must be at least 1, got {shard_size}")
    if dtype not in PRECISIONS:
        raise CorpusError(f"--precision must be one of {', '.join(PRECISIONS)}, got {dtype}")
    if isinstance(max_tokens_per_batch, bool) or not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 1:
        raise CorpusError(f"--max-tokens-per-batch must be at least 1, got {max_tokens_per_batch}")


def check_locations(source: CorpusSource, output_dir: Path) -> None:
    """The output folder must not lie inside the input folder (a rerun would read its own shards as input)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise CorpusError(f"{output_dir} exists and is not a folder")
    if source.dataset is None and Path(source.path).is_dir():
        from ..readers import read_folders

        out = output_dir.resolve()
        for root in read_folders(source.path):  # the input folder and every folder its links lead to
            if out == root or root in out.parents:
                through = "" if root == Path(source.path).resolve() else f" (through a link to {root})"
                raise CorpusError(f"the output folder {output_dir} lies inside the input folder {source.path}"
                                  f"{through}; choose an output outside it")


def encode_corpus(
    model: str,
    source: str | CorpusSource | Any,
    output_dir: str | Path,
    *,
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
    device: str | None = None,
    show_progress_bar: bool | None = None,
    quantize: str | None = None,
    trust_remote_code: bool = False,
    ray: str | None = None,
    num_actors: int | None = None,
    truncate_dim: int | None = None,
    precision: str | None = None,
    calibration: CalibrationRanges | None = None,
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS,
    compile: bool = False,
) -> CorpusResult:
    """Embed a corpus (a JSON-lines, CSV or parquet file, a folder of them, a Hub dataset id, or a `datasets`
    dataset; read as docs/guides/input-files.md says) into `output_dir`: `part-NNNNN.parquet` shards of `shard_size`
    input rows plus the manifest.

    Rerunning resumes (complete shards are verified and kept); other settings are refused unless `overwrite`.
    Under torchrun every rank calls this: rank r computes shards r, r + WORLD_SIZE, ... on its LOCAL_RANK GPU.
    `ray="auto"` (or "host:port", or "local" for a new local instance; extra `[ray]`) spreads the shards over a
    Ray cluster's actor pool instead (`num_actors`: default one per GPU, else one per CPU); the output is the
    same. Raises `CorpusError` for a problem with the input, the options or the output folder.

    `truncate_dim` (default: the model's stored one) keeps the first dimensions, renormalised; `precision`
    (`compact.PRECISIONS`; default `dtype`) stores float16, int8/uint8 codes or packed binary bits. int8/uint8 use
    `calibration` ranges (`compact.load_calibration`, refused if another model's), else ranges computed from an
    evenly spread sample of `calibration_rows` rows, stored in the manifest for the queries. `compile` compiles
    every process's model (`encoding.compile_backbone`); the vectors are the same, so it is no manifest setting.
    """
    dtype = resolve_precision(dtype, precision)
    check_options(shard_size, dtype, max_tokens_per_batch)
    check_calibration_rows(calibration_rows)
    check_max_seq_length(max_seq_length, None)
    check_prompt_name(model, prompt_name)
    source = as_source(source, field, id_field, title_field, split, subset)
    output_dir = final_path(Path(output_dir))  # a link the user made for OUT is followed, even to a new folder
    check_locations(source, output_dir)
    check_first_row(source, skip_bad_rows=skip_bad_rows)  # a wrong --input or --field, before the model loads
    options = dict(prompt=prompt, prompt_name=prompt_name, max_tokens_per_batch=max_tokens_per_batch,
                   max_seq_length=max_seq_length, quantize=quantize, trust_remote_code=trust_remote_code,
                   truncate_dim=truncate_dim, compile=compile)
    job_options = dict(shard_size=shard_size, dtype=dtype, skip_bad_rows=skip_bad_rows, overwrite=overwrite,
                       quantize=quantize, truncate_dim=truncate_dim, calibration=calibration,
                       calibration_rows=calibration_rows)
    if ray is not None:
        if device is not None:
            raise CorpusError("device does not apply with Ray (--ray): Ray places one actor per GPU (CPU where none)")
        from .ray_data import encode_on_ray

        with output_lock(output_dir):  # one job per output folder
            return encode_on_ray(model, source, output_dir, address=ray, options=options, job_options=job_options,
                                 show_progress_bar=show_progress_bar, num_actors=num_actors)
    ranks = torchrun_ranks()
    with distributed.process_group(ranks), contextlib.ExitStack() as held:
        # Each step ends with every rank learning whether another failed (distributed.together): a failure on
        # one rank is reported once, by rank 0, and no rank waits for a rank that is gone.
        with distributed.together(ranks):
            if ranks.is_main:  # one job per output folder: a second one is refused, naming this one
                held.enter_context(output_lock(output_dir))
        with distributed.together(ranks):
            st_model, encoder = load(model, device=distributed.device_for(ranks, device), **options)
        job = None
        with distributed.together(ranks):
            if ranks.is_main:
                job = plan_job(model, st_model, encoder, source, output_dir, **job_options)
        job = distributed.broadcast(job, ranks)

        mine = [k for k in range(job.plan.num_shards) if ranks.owns(k)]
        with distributed.together(ranks):
            infos = {k: job.verified(k) for k in mine}
            pending = [k for k in mine if infos[k] is None]
            logger.info("rank %d: %d of its %d shards to compute", ranks.rank, len(pending), len(mine))
            total = sum(job.plan.shard_rows[k] for k in pending)
            description = "embedding" if ranks.world_size == 1 else f"rank 0/{ranks.world_size} embedding"
            progress = progress_bar(total, show_progress_bar if ranks.is_main else False, description)
            try:
                for k in pending:
                    infos[k] = job.compute(k, encoder, progress)
            finally:
                if progress is not None:
                    progress.close()
        everyone = [info for part in distributed.gather(list(infos.values()), ranks) for info in part]
        manifest = None
        if ranks.is_main:
            computed = [i for i in everyone if i.computed]
            warn_truncated(sum(i.truncated for i in computed), sum(i.rows for i in computed), encoder.max_length)
            manifest = finish_manifest(output_dir, job.settings, everyone, skipped=job.plan.skipped,
                                       skipped_examples=job.plan.skipped_examples,
                                       extra={**job.manifest_fields(), "created_by": f"diffembed-hf {__version__}"})
    return CorpusResult(output_dir, sum(i.rows for i in everyone), job.plan.num_shards,
                        sorted(i.index for i in everyone if i.computed), job.plan.skipped, manifest)


def check_calibration_rows(rows: int) -> None:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 2:
        raise CorpusError(f"--calibration-rows must be at least 2, got {rows}")
