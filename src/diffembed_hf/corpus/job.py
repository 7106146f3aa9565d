"""The corpus job both drivers run: what a process needs to compute any shard (`CorpusJob`), how rank 0 plans it
(`plan_job`: read the corpus once, fix the settings and calibration ranges, open the output folder) and how each
process loads its model (`load`). The torchrun / single-process driver is `encode.encode_corpus`, the Ray driver
`ray_data.encode_on_ray`; both import this module, neither the other.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from sentence_transformers import SentenceTransformer

from ..packed_encoder import PackedEncoder, resolve_prompt
from ..model_folder import ModelFolder, model_identity, settings_digest
from ..compact import DEFAULT_CALIBRATION_ROWS, SCALAR, CalibrationRanges, Compaction, calibrate, calibration_sample, \
    truncate
from ..encoding import load_encoder
from .read import CorpusError, CorpusSource, ShardPlan, iter_rows, scan
from .shards import ShardInfo, check_settings_early, prepare_folder, read_manifest, verify_shard, write_shard

logger = logging.getLogger(__name__)


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

    def compute(self, shard: int, encoder: PackedEncoder, progress=None) -> ShardInfo:
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


def load(model: str | ModelFolder, *, device: str | None = None, prompt: str | None, prompt_name: str | None,
         max_tokens_per_batch: int, max_seq_length: int | None, quantize: str | None,
         trust_remote_code: bool, truncate_dim: int | None = None,
         compile: bool = False) -> tuple[SentenceTransformer, PackedEncoder]:
    """The model and the encoder a process (a rank, a Ray actor) computes shards with."""
    st_model = load_encoder(model, device=device, max_seq_length=max_seq_length, quantize=quantize,
                            trust_remote_code=trust_remote_code, truncate_dim=truncate_dim, compile=compile)
    return st_model, PackedEncoder(st_model, prompt=resolve_prompt(st_model, prompt, prompt_name),
                             max_tokens_per_batch=max_tokens_per_batch)


def plan_job(model_name: str | ModelFolder, model: SentenceTransformer, encoder: PackedEncoder, source,
             output_dir: Path, *,
             shard_size: int, dtype: str, skip_bad_rows: bool, overwrite: bool, quantize: str | None = None,
             truncate_dim: int | None = None, calibration: CalibrationRanges | None = None,
             calibration_rows: int = DEFAULT_CALIBRATION_ROWS) -> CorpusJob:
    """Rank 0's part: read the corpus, fix the settings (calibration ranges included), check and open the output
    folder."""
    compaction = Compaction(model.truncate_dim if truncate_dim is None else truncate_dim, dtype, calibration)
    identity = (model_name.identity if isinstance(model_name, ModelFolder) else
                model_identity(model_name, getattr(model[0].auto_model.config, "_commit_hash", None))).as_dict()
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


def _calibrate(encoder: PackedEncoder, source: CorpusSource, plan: ShardPlan, truncate_dim: int | None, identity: dict,
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
