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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..packed_encoder import progress_bar, warn_truncated
from ..model_folder import as_model_folder
from ..compact import DEFAULT_CALIBRATION_ROWS
from ..encoding import EncodeOptions, check_prompt_name
from ..errors import OptionError
from ..outputs import final_path, output_lock
from ..validation import check_positive_int, is_positive_int, read_options, with_overrides
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


@dataclass
class CorpusOptions(EncodeOptions):
    """How `encode_corpus` embeds a corpus: `EncodeOptions` plus the corpus's fields, its shards and where they
    are computed (this process, torchrun's ranks, or Ray), checked once, here."""

    field: str = "text"
    id_field: str | None = None  # None: _id, else id, else the row number
    title_field: str | None = None  # a title joined to the text as mteb does
    split: str | None = None  # a Hub dataset's split (None: its only one)
    subset: str | None = None  # a Hub dataset's configuration
    prompt: str | None = None  # text put before every row (instead of a stored `prompt_name`)
    shard_size: int = DEFAULT_SHARD_SIZE  # input rows per shard
    skip_bad_rows: bool = False  # leave out rows without a string text (counted in the manifest)
    calibration_rows: int = DEFAULT_CALIBRATION_ROWS  # int8/uint8: the sample the ranges come from
    ray: str | None = None  # "auto", "host:port" or "local": spread the shards over a Ray cluster
    num_actors: int | None = None  # Ray actors (None: one per GPU, else one per CPU)

    def __post_init__(self):
        super().__post_init__()
        check_positive_int("shard_size", self.shard_size)
        check_positive_int("num_actors", self.num_actors, optional=True)
        if not is_positive_int(self.calibration_rows) or self.calibration_rows < 2:
            raise OptionError("calibration_rows", f"must be an integer >= 2, got {self.calibration_rows!r}")
        if self.ray is not None and self.device is not None:
            raise CorpusError("device does not apply with Ray (--ray): Ray places one actor per GPU (CPU where none)")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> CorpusOptions:
        """The options a JSON file of field values sets, `overrides` winning; unknown keys are an error."""
        return read_options(cls, path, "corpus", **overrides)


def encode_corpus(model: str, source: str | CorpusSource | Any, output_dir: str | Path,
                  options: CorpusOptions | None = None, **overrides) -> CorpusResult:
    """Embed a corpus (a JSON-lines, CSV or parquet file, a folder of them, a Hub dataset id, or a `datasets`
    dataset; read as docs/guides/input-files.md says) into `output_dir`: `part-NNNNN.parquet` shards of `shard_size`
    input rows plus the manifest. `options` is a `CorpusOptions`; its fields may also be given as keywords
    (`encode_corpus(model, source, out, shard_size=1000)`), over `options` where both are given.

    Rerunning resumes (complete shards are verified and kept); other settings are refused unless `overwrite`.
    Under torchrun every rank calls this: rank r computes shards r, r + WORLD_SIZE, ... on its LOCAL_RANK GPU.
    `ray="auto"` (or "host:port", or "local" for a new local instance; extra `[ray]`) spreads the shards over a
    Ray cluster's actor pool instead (`num_actors`: default one per GPU, else one per CPU); the output is the
    same. Raises `CorpusError` for a problem with the input or the output folder, `OptionError` for an option
    out of its range.

    `truncate_dim` (default: the model's stored one) keeps the first dimensions, renormalised; `precision`
    (`compact.PRECISIONS`; default `dtype`) stores float16, int8/uint8 codes or packed binary bits. int8/uint8 use
    `calibration` ranges (`compact.load_calibration`, refused if another model's), else ranges computed from an
    evenly spread sample of `calibration_rows` rows, stored in the manifest for the queries. `compile` compiles
    every process's model (`encoding.compile_backbone`); the vectors are the same, so it is no manifest setting.
    """
    o = with_overrides(CorpusOptions, options, overrides)
    dtype = o.stored_precision
    folder = as_model_folder(model, trust_remote_code=o.trust_remote_code)  # opened once, handed to every loader
    check_prompt_name(folder, o.prompt_name)
    model = folder or model
    source = as_source(source, o.field, o.id_field, o.title_field, o.split, o.subset)
    output_dir = final_path(Path(output_dir))  # a link the user made for OUT is followed, even to a new folder
    check_locations(source, output_dir)
    check_first_row(source, skip_bad_rows=o.skip_bad_rows)  # a wrong --input or --field, before the model loads
    options = dict(prompt=o.prompt, prompt_name=o.prompt_name, max_tokens_per_batch=o.max_tokens_per_batch,
                   max_seq_length=o.max_seq_length, quantize=o.quantize, trust_remote_code=o.trust_remote_code,
                   truncate_dim=o.truncate_dim, compile=o.compile)
    job_options = dict(shard_size=o.shard_size, dtype=dtype, skip_bad_rows=o.skip_bad_rows, overwrite=o.overwrite,
                       quantize=o.quantize, truncate_dim=o.truncate_dim, calibration=o.calibration,
                       calibration_rows=o.calibration_rows)
    ray, device, show_progress_bar, num_actors = o.ray, o.device, o.show_progress_bar, o.num_actors
    if ray is not None:
        from .ray_data import encode_on_ray

        with output_lock(output_dir):  # one job per output folder
            return encode_on_ray(model, source, output_dir, address=ray, options=options, job_options=job_options,
                                 show_progress_bar=show_progress_bar, num_actors=num_actors)
    return _encode_on_ranks(model, source, output_dir, options, job_options, device, show_progress_bar)


def _encode_on_ranks(model, source: CorpusSource, output_dir: Path, options: dict, job_options: dict,
                     device: str | None, show_progress_bar: bool | None) -> CorpusResult:
    """The corpus job on this process, or on each torchrun rank: rank 0 plans it and writes the manifest, every
    rank computes the shards it owns."""
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
