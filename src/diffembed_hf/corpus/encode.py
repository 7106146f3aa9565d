"""`encode_corpus`: a corpus of any size -> a folder of parquet shards and a manifest, resumable, on one
process or on every rank of a torchrun job.

Rank 0 reads the corpus once (validation, duplicate ids, shard boundaries, input digests) and checks the
output folder; every rank then computes the shards it owns (k % WORLD_SIZE), skipping those already complete,
and rank 0 writes the manifest once all ranks are done. Shard k is input rows [k * shard_size, (k+1) *
shard_size) whoever computes it, so the output never depends on the number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sentence_transformers import SentenceTransformer

from .. import __version__
from ..batching import Encoder, progress_bar, resolve_prompt, warn_truncated
from ..checkpoint import model_identity, settings_digest
from ..compact import DEFAULT_CALIBRATION_ROWS, SCALAR, CalibrationRanges, Compaction, calibrate, \
    calibration_sample, truncate
from ..encoding import EncodeOptions, check_prompt_name, load_encoder
from ..errors import OptionError
from ..files import final_path, output_lock
from ..validation import check_positive_int, is_positive_int, read_options, with_overrides
from . import distributed
from .read import CorpusError, CorpusSource, ShardPlan, check_first_row, iter_rows, scan
from .shards import (ShardInfo, check_settings_early, finish_manifest, prepare_folder, read_manifest, verify_shard,
                     write_shard)

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = 10_000


@dataclass
class CorpusResult:
    output_dir: Path
    rows: int  # rows embedded (all shards)
    shards: int
    computed: list[int]  # shards computed by this run (all ranks); the others were complete already
    skipped_rows: int
    manifest: dict | None  # rank 0 only


@dataclass
class CorpusJob:
    """Everything a process needs to compute any shard: broadcast by rank 0, sent to Ray actors."""

    source: CorpusSource  # with the id field resolved
    output_dir: Path
    plan: ShardPlan
    settings: dict
    dtype: str  # the precision of the stored column (compact.PRECISIONS)
    known_digests: dict[int, str] = dataclasses.field(default_factory=dict)  # an earlier run's manifest, per shard
    compaction: Compaction = Compaction()  # truncation and precision applied to the float vectors
    width: int = 0  # the model's embedding dimension

    def manifest_fields(self) -> dict:
        """What a reader of the vectors needs besides the type: the truncation, bytes per vector, the ranges."""
        ranges = self.compaction.calibration
        return {"precision": self.dtype, "truncate_dim": self.compaction.truncate_dim,
                "bytes_per_vector": self.compaction.bytes_per_vector(self.width),
                "calibration": ranges.to_dict() if ranges is not None else None}

    def stamp(self, shard: int) -> dict:
        return {"settings": settings_digest(self.settings), "input": self.plan.digests[shard]}

    def input_rows(self, shard: int) -> int:
        return min(self.plan.shard_size, self.plan.rows - self.plan.starts[shard][1])

    def verified(self, shard: int) -> ShardInfo | None:
        return verify_shard(self.output_dir, shard, self.stamp(shard), self.plan.shard_rows[shard],
                            self.known_digests.get(shard))

    def compute(self, shard: int, encoder: Encoder, progress=None) -> ShardInfo:
        """Read shard `shard`'s rows (from its start position), embed the good ones, write the shard."""
        position, index = self.plan.starts[shard]
        ids, texts = [], []
        for row in iter_rows(self.source, position, index):
            if row.problem is None:
                ids.append(row.id)
                texts.append(row.text)
            if row.index + 1 >= index + self.input_rows(shard):
                break
        if len(ids) != self.plan.shard_rows[shard]:
            raise CorpusError(f"the input changed while being embedded (shard {shard} now has {len(ids)} rows, "
                              f"{self.plan.shard_rows[shard]} when it was read first)")
        embeddings, truncated = encoder.embed(texts, progress)
        info = write_shard(self.output_dir, shard, ids, self.compaction.apply(embeddings), self.dtype,
                           self.stamp(shard))
        info.truncated = truncated
        return info


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


def load(model: str, *, device: str | None = None, prompt: str | None, prompt_name: str | None,
         max_tokens_per_batch: int, max_seq_length: int | None, quantize: str | None,
         trust_remote_code: bool, truncate_dim: int | None = None,
         compile: bool = False) -> tuple[SentenceTransformer, Encoder]:
    """The model and the encoder a process (a rank, a Ray actor) computes shards with."""
    st_model = load_encoder(model, device=device, max_seq_length=max_seq_length, quantize=quantize,
                            trust_remote_code=trust_remote_code, truncate_dim=truncate_dim, compile=compile)
    return st_model, Encoder(st_model, prompt=resolve_prompt(st_model, prompt, prompt_name),
                             max_tokens_per_batch=max_tokens_per_batch)


def plan_job(model_name: str, model: SentenceTransformer, encoder: Encoder, source, output_dir: Path, *,
             shard_size: int, dtype: str, skip_bad_rows: bool, overwrite: bool, quantize: str | None = None,
             truncate_dim: int | None = None, calibration: CalibrationRanges | None = None,
             calibration_rows: int = DEFAULT_CALIBRATION_ROWS) -> CorpusJob:
    """Rank 0's part: read the corpus, fix the settings (calibration ranges included), check and open the output
    folder."""
    compaction = Compaction(model.truncate_dim if truncate_dim is None else truncate_dim, dtype, calibration)
    identity = model_identity(model_name, getattr(model[0].auto_model.config, "_commit_hash", None)).as_dict()
    compaction.check(encoder.dim, identity)
    plan = scan(source, shard_size, skip_bad_rows=skip_bad_rows)
    if plan.good_rows == 0:
        raise CorpusError(f"the corpus is empty: {plan.rows} rows, none to embed" if plan.rows else
                          "the corpus is empty (no rows)")
    settings = {
        **identity,
        "prompt": encoder.prompt, "max_seq_length": encoder.max_length, "normalized": encoder.normalize,
        "include_prompt": encoder.include_prompt, "weights_dtype": str(encoder.auto_model.dtype).removeprefix("torch."),
        **({"quantize": quantize} if quantize else {}),
        "dtype": dtype, "truncate_dim": compaction.truncate_dim, "dim": compaction.output_dim(encoder.dim),
        "shard_size": shard_size, **source.describe(), "id_field": plan.id_field,
        "skip_bad_rows": skip_bad_rows, "rows": plan.rows, "input_digest": plan.corpus_digest(),
    }
    source = dataclasses.replace(source, id_field=plan.id_field)
    if dtype in SCALAR:
        if compaction.calibration is None:
            ranges = _earlier_ranges(output_dir, settings, calibration_rows)
            if ranges is None:  # other settings (another --calibration-rows...) are refused before the sample
                check_settings_early(output_dir, {**settings, "calibration_rows": calibration_rows},
                                     overwrite=overwrite, pending=("calibration",))
                ranges = _calibrate(encoder, source, plan, compaction.truncate_dim, identity, calibration_rows)
            compaction = dataclasses.replace(compaction, calibration=ranges)
        settings["calibration"] = compaction.calibration.digest()
        settings["calibration_rows"] = calibration_rows
    job = CorpusJob(source, output_dir, plan, settings, dtype, compaction=compaction, width=encoder.dim)
    job.known_digests = prepare_folder(output_dir, settings, overwrite=overwrite, extra=job.manifest_fields())
    return job


def _earlier_ranges(output_dir: Path, settings: dict, calibration_rows: int) -> CalibrationRanges | None:
    """The ranges an interrupted run with the same settings computed: a resumed run reuses them rather than
    computing them again (on another device they could differ in the last bits, and its shards would not match)."""
    manifest = read_manifest(output_dir) if output_dir.is_dir() else None
    previous = (manifest or {}).get("settings") or {}
    if not manifest or not manifest.get("calibration") or previous.get("calibration_rows") != calibration_rows:
        return None
    ignored = ("calibration", "calibration_rows")
    if {k: v for k, v in previous.items() if k not in ignored} != settings:
        return None
    ranges = CalibrationRanges.from_dict(manifest["calibration"], source=f"the manifest of {output_dir}")
    return ranges if ranges.digest() == previous.get("calibration") else None


def _calibrate(encoder: Encoder, source: CorpusSource, plan: ShardPlan, truncate_dim: int | None, identity: dict,
               rows: int) -> CalibrationRanges:
    """int8/uint8 ranges from an evenly spread sample of the corpus's good rows, embedded as the shards are."""
    wanted = set(calibration_sample(plan.good_rows, rows))
    texts, good = [], 0
    for row in iter_rows(source):
        if row.problem is None:
            if good in wanted:
                texts.append(row.text)
            good += 1
            if len(texts) == len(wanted):
                break
    logger.info("int8/uint8 calibration: embedding a sample of %d rows", len(texts))
    embeddings, _ = encoder.embed(texts)
    return calibrate(truncate(embeddings, truncate_dim), identity)


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
    check_prompt_name(model, o.prompt_name)
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
    ranks = distributed.current()
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

