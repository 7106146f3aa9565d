"""The model card rendered from its template and a folder's records: the sections and values a known training or
conversion record must put on it (typed out here, not taken from the builder), and nothing from records the folder
lacks."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard

from diffembed_hf.model_card import build_model_card, is_generated_card

TRAINING = {
    "base_model": "Dream-org/Dream-v0-Instruct-7B", "base_model_revision": None,
    "datasets": ["siyue/ReasonAug", "/home/someone/rows.jsonl"],
    "hyperparameters": {"max_steps": 40, "learning_rate": 0.0001, "matryoshka_dims": [64, 32], "truncate_dim": 32},
    "training": {"steps": 40, "epochs": 2.5, "samples": 160, "devices": 1, "first_loss": 2.25, "final_loss": 0.5,
                 "losses": [], "peak_learning_rate": 0.0001, "warmup_steps": 4, "device_settings": None,
                 "resumed_from_step": 20},
    "evaluation": {"split": "held-out 10% of siyue/ReasonAug", "max_seq_length": 64,
                   "metrics": {"ndcg@10": 0.75}, "metrics_before_training": {"ndcg@10": 0.25}},
    "training_time_seconds": 3725.0,
}
CONVERSION = {
    "source": "org/tiny-gguf", "hub_id": "org/tiny-gguf", "family": "qwen2", "family_title": "Qwen2",
    "diffusion": False, "dtype": "bfloat16", "command": "diffembed convert org/tiny-gguf tiny --max-seq-length 64",
    "sliding_window": 2048, "version": "0.1.0",
    "gguf": {"file": "tiny-Q8_0.gguf", "architecture": "qwen2", "quantization": "Q8_0",
             "tensor_types": {"F32": 2, "Q8_0": 5}, "dequantized_to": "bfloat16", "name": None, "license": None},
}


def sections(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("## ")]


def test_a_trained_folder_card_carries_its_training_record(tiny_folders, tmp_path):
    folder = tiny_folders.copy(tmp_path / "trained")
    (folder / "diffembed_training.json").write_text(json.dumps(TRAINING))
    card = build_model_card(folder, "me/trained")
    text = str(card)
    assert text.startswith("---\n") and is_generated_card(text)
    assert sections(text) == ["## Usage", "## Model details", "## Training", "## Evaluation", "## Citation"]
    assert ("Fine-tuned with `diffembed train` (diffembed-hf) from [Dream-org/Dream-v0-Instruct-7B]"
            "(https://huggingface.co/Dream-org/Dream-v0-Instruct-7B) on [siyue/ReasonAug]"
            "(https://huggingface.co/datasets/siyue/ReasonAug), `rows.jsonl` (local) in 1 h 02 min.") in text
    assert ("Ran 40 optimizer steps (160 training pairs seen, 2.5 epochs, 1 device(s)); loss 2.25 -> 0.5; "
            "resumed from step 20.") in text
    assert "| learning_rate | 0.0001 |" in text and "| matryoshka_dims | 64, 32 |" in text
    assert 'model = SentenceTransformer("me/trained", trust_remote_code=True, truncate_dim=32)' in text
    assert "This folder stores `truncate_dim=32`" in text
    assert "On held-out 10% of siyue/ReasonAug:" in text and "| ndcg@10 | 0.25 | 0.75 |" in text
    assert "/home/someone" not in text  # a local dataset shows its name only
    data = ModelCard(text).data
    assert data.base_model == "Dream-org/Dream-v0-Instruct-7B" and data.datasets == ["siyue/ReasonAug"]
    # the template's closing part, filled
    assert "## Citation\n\nThe DiffEmbed study:\n\n```bibtex\n@inproceedings{zhang-etal-2025-diffusion," in text
    assert "\n```\n\nCard written by diffembed-hf " in text and "$" not in text.split("## Citation")[1]


def test_a_converted_folder_card_carries_its_conversion_record(tiny_folders, tmp_path):
    folder = tiny_folders.copy(tmp_path / "converted")
    (folder / "diffembed_conversion.json").write_text(json.dumps(CONVERSION))
    text = str(build_model_card(folder, "me/converted"))
    assert sections(text) == ["## Usage", "## Model details", "## Conversion", "## Citation"]  # no training section
    assert "Its weights were converted from `org/tiny-gguf`: Qwen2, bfloat16 weights." in text
    assert "dequantized from the Q8_0-quantized GGUF file `tiny-Q8_0.gguf` (qwen2)" in text
    assert "**Not trained as an embedder.** The weights are those of an autoregressive LLM" in text
    assert "**Sliding window ignored.** The source was trained with a 2048-token sliding window" in text
    assert ("**From a quantized GGUF file.** Source `tiny-Q8_0.gguf`, quantization Q8_0 (tensor types "
            '{"F32": 2, "Q8_0": 5}), dequantized to bfloat16') in text
    assert "```bash\ndiffembed convert org/tiny-gguf tiny --max-seq-length 64\n```" in text
    assert "Converted with diffembed-hf 0.1.0." in text
    assert ModelCard(text).data.base_model == "org/tiny-gguf"  # the lineage: the conversion's Hub source


def test_a_folder_without_records_is_said_to_be_untrained(tiny_folders, tmp_path):
    """Control for the two above: without a record, neither its values nor its sections appear."""
    folder = tiny_folders.copy(tmp_path / "bare")
    text = str(build_model_card(folder, "me/bare"))
    assert sections(text) == ["## Usage", "## Model details", "## Training", "## Citation"]
    assert "No training record (`diffembed_training.json`) came with this checkpoint" in text
    assert "Fine-tuned with" not in text and "Converted with" not in text and "a local checkpoint" in text
