"""The records jobs leave beside their output own their JSON: a record written by the code before the records
became classes (the literals below, as `files.write_json` wrote them) reads back and writes the same bytes, and a
record that cannot be read is refused naming its file."""

from __future__ import annotations

import json

import pytest

from diffembed_hf.errors import EvaluationError, ModelFilesError
from diffembed_hf.evaluation.run import RunRecord
from diffembed_hf.evaluation.summary import Summary, read_summary
from diffembed_hf.outputs import write_json
from diffembed_hf.records import ConversionRecord, CorpusManifest, TrainingRecord

TRAINING = """{
  "base_model": "Dream-org/Dream-v0-Instruct-7B",
  "base_model_revision": "05334cb9faaf763692dcf9d8737c642be2b2a6ae",
  "datasets": [
    "siyue/ReasonAug",
    "/data/held-out.jsonl"
  ],
  "hyperparameters": {
    "max_steps": 3,
    "batch_size": 2,
    "learning_rate": 0.0001,
    "matryoshka_dims": [
      64,
      32
    ],
    "query_prompt": "Instruct: retrieve\\nQuery: ",
    "bf16": null
  },
  "training": {
    "steps": 3,
    "epochs": 1.5,
    "samples": 6,
    "devices": 1,
    "first_loss": 2.0794,
    "final_loss": 1.5,
    "losses": [
      {
        "step": 1,
        "loss": 2.0794,
        "learning_rate": 0.0001
      }
    ],
    "peak_learning_rate": 0.0001,
    "warmup_steps": 0,
    "device_settings": {
      "threads": 2
    },
    "resumed_from_step": null
  },
  "evaluation": {
    "split": "held-out 10% of siyue/ReasonAug",
    "max_seq_length": 64,
    "metrics": {
      "ndcg@10": 0.5
    },
    "metrics_before_training": {
      "ndcg@10": 0.25
    }
  },
  "training_time_seconds": 12.3
}
"""

CONVERSION = """{
  "source": "org/model.gguf",
  "hub_id": null,
  "family": "qwen2",
  "family_title": "Qwen2 (autoregressive)",
  "diffusion": false,
  "dtype": "bfloat16",
  "command": "diffembed convert org/model.gguf out --max-seq-length 512",
  "sliding_window": 4096,
  "version": "0.1.0",
  "gguf": {
    "file": "model-Q4_1.gguf",
    "architecture": "qwen2",
    "quantization": "Q4_1",
    "tensor_types": {
      "F32": 3,
      "Q4_1": 7
    },
    "dequantized_to": "bfloat16",
    "name": "Tiny",
    "license": "apache-2.0"
  }
}
"""

SETTINGS = """{
    "model": "m",
    "revision": null,
    "dim": 8,
    "prompt": "",
    "normalized": true,
    "max_seq_length": 64,
    "dtype": "int8",
    "shard_size": 5
  }"""
VECTORS = """"precision": "int8",
  "truncate_dim": null,
  "bytes_per_vector": 8,
  "calibration": {
    "format": "diffembed-calibration/1",
    "model": "m",
    "revision": null,
    "model_sha256": "ab",
    "dim": 1,
    "rows": 10,
    "min": [
      -1.0
    ],
    "max": [
      1.0
    ]
  }"""
OPENING = f"""{{
  "format": "diffembed-corpus-embeddings/1",
  "complete": false,
  {VECTORS},
  "settings": {SETTINGS},
  "shards": [
    {{
      "file": "part-00000.parquet",
      "sha256": "00"
    }}
  ]
}}
"""
FINISHED = f"""{{
  "format": "diffembed-corpus-embeddings/1",
  "complete": true,
  "model": "m",
  "revision": null,
  "dim": 8,
  "prompt": "",
  "normalized": true,
  "max_seq_length": 64,
  "dtype": "int8",
  "rows": 7,
  "skipped_rows": 1,
  "skipped_examples": [
    "row 3: no text"
  ],
  "shards": [
    {{
      "file": "part-00000.parquet",
      "rows": 5,
      "sha256": "00"
    }},
    {{
      "file": "part-00001.parquet",
      "rows": 2,
      "sha256": "01"
    }}
  ],
  {VECTORS},
  "created_by": "diffembed-hf 0.1.0",
  "settings": {SETTINGS}
}}
"""

IDENTITY = """{
    "model": "/models/m",
    "revision": null,
    "model_sha256": "ab",
    "key": "local-ab"
  }"""
RUN_STARTED = f"""{{
  "model": "/models/m",
  "identity": {IDENTITY},
  "finished": false
}}
"""
RUN_FINISHED = f"""{{
  "model": "/models/m",
  "identity": {IDENTITY},
  "finished": true,
  "mteb_model_name": "local/m",
  "mteb_revision": "ab",
  "suite": null,
  "max_seq_length": 64,
  "mteb_version": "2.26.24",
  "diffembed_hf_version": "0.1.0",
  "evaluated": "2026-12-06 12:00:00",
  "vectors": {{
    "dim": 8,
    "bytes_per_vector": 32,
    "calibrations": null
  }},
  "tasks": {{
    "Local": {{
      "type": "Retrieval",
      "dataset": "local/Local"
    }}
  }}
}}
"""
SUMMARY = f"""{{
  "format": "diffembed-evaluate-summary",
  "version": 2,
  "model": {IDENTITY},
  "results": [
    {{
      "task": "Local",
      "settings": {{
        "max_seq_length": 64
      }},
      "settings_key": "0123456789ab",
      "scores": {{
        "main_score": 0.5,
        "metric": "ndcg_at_10"
      }}
    }}
  ]
}}
"""


def rewritten(record, tmp_path) -> str:
    write_json(tmp_path / "record.json", record.to_dict())
    return (tmp_path / "record.json").read_text(encoding="utf-8")


@pytest.mark.parametrize("cls, text", [
    (TrainingRecord, TRAINING), (ConversionRecord, CONVERSION), (CorpusManifest, OPENING),
    (CorpusManifest, FINISHED), (RunRecord, RUN_STARTED), (RunRecord, RUN_FINISHED), (Summary, SUMMARY),
], ids=["training", "conversion", "manifest-opening", "manifest-finished", "run-started", "run-finished", "summary"])
def test_a_record_written_before_reads_back_and_writes_the_same_bytes(cls, text, tmp_path):
    json.loads(text)  # control: the literal is JSON as the jobs wrote it
    assert rewritten(cls.from_dict(json.loads(text)), tmp_path) == text


def test_records_read_as_attributes():
    trained = TrainingRecord.from_dict(json.loads(TRAINING))
    assert trained.training.steps == 3 and trained.evaluation.metrics == {"ndcg@10": 0.5}
    assert trained.hyperparameters["matryoshka_dims"] == [64, 32]
    converted = ConversionRecord.from_dict(json.loads(CONVERSION))
    assert converted.gguf.quantization == "Q4_1" and converted.sliding_window == 4096
    manifest = CorpusManifest.from_dict(json.loads(FINISHED))
    assert manifest.calibration["rows"] == 10 and manifest.rows == 7
    assert RunRecord.from_dict(json.loads(RUN_STARTED)).identity["model_sha256"] == "ab"


def test_a_conversion_record_without_gguf_writes_no_gguf_key(tmp_path):
    values = {k: v for k, v in json.loads(CONVERSION).items() if k != "gguf"}
    assert "gguf" not in json.loads(rewritten(ConversionRecord.from_dict(values), tmp_path))


def test_a_record_that_cannot_be_read_is_refused_naming_its_file(tmp_path):
    path = tmp_path / TrainingRecord.FILE
    with pytest.raises(ModelFilesError, match=f"{path}.*'training_time_seconds' must be"):
        TrainingRecord.from_dict({**json.loads(TRAINING), "training_time_seconds": "soon"}, source=path)
    with pytest.raises(ModelFilesError, match=f"{path}.*expected a JSON object"):
        TrainingRecord.from_dict([1, 2], source=path)
    with pytest.raises(ModelFilesError, match="training.*'steps' must be int"):
        TrainingRecord.from_dict({"training": {"steps": True}}, source=path)  # a bool is no step count
    with pytest.raises(ModelFilesError, match=r"gguf.*'tensor_types' must be dict"):
        ConversionRecord.from_dict({"gguf": {"tensor_types": []}}, source=tmp_path / ConversionRecord.FILE)
    with pytest.raises(ModelFilesError, match="not a diffembed corpus manifest"):
        CorpusManifest.from_dict({"format": "something else"}, source=tmp_path / CorpusManifest.FILE)
    with pytest.raises(EvaluationError, match="no model identity"):
        RunRecord.from_dict({"model": "m"}, source=tmp_path / RunRecord.FILE)
    (tmp_path / Summary.FILE).write_text('{"format": "diffembed-evaluate-summary", "version": 2, "model": 1}')
    with pytest.raises(EvaluationError, match=f"{tmp_path / Summary.FILE}: damaged summary"):
        read_summary(tmp_path)


def test_a_folder_without_a_record_reads_none_and_an_empty_one_too(tmp_path):
    assert TrainingRecord.read(tmp_path) is None
    (tmp_path / TrainingRecord.FILE).write_text("{}")
    assert TrainingRecord.read(tmp_path) is None
    (tmp_path / TrainingRecord.FILE).write_text(TRAINING)
    assert TrainingRecord.read(tmp_path).base_model == "Dream-org/Dream-v0-Instruct-7B"


CALIBRATION = """{
 "format": "diffembed-calibration/1",
 "model": "/models/m",
 "revision": null,
 "model_sha256": "ab",
 "dim": 2,
 "rows": 10,
 "min": [
  -0.5,
  -0.25
 ],
 "max": [
  0.75,
  1.0
 ]
}
"""


def test_a_calibration_file_written_before_reads_back_and_writes_the_same_bytes(tmp_path):
    from diffembed_hf.compact import CalibrationRanges, load_calibration, save_calibration

    (tmp_path / "ranges.json").write_text(CALIBRATION)
    ranges = load_calibration(tmp_path / "ranges.json")
    assert ranges.dim == 2 and ranges.model["model_sha256"] == "ab"
    save_calibration(ranges, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == CALIBRATION
    # the ranges a corpus manifest holds are read through the manifest record
    (tmp_path / CorpusManifest.FILE).write_text(FINISHED)
    assert load_calibration(tmp_path).digest() == CalibrationRanges.from_dict(
        json.loads(FINISHED)["calibration"]).digest()
