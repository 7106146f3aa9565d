"""The model card of every folder this package writes or pushes: one builder, used by convert, train and push.

The card is assembled from the folder itself (config, weights' headers, prompts) and the records the jobs leave
in it (`records.ConversionRecord`, written by `diffembed convert`, and `records.TrainingRecord`, written by
`diffembed train`), into the template `model_card_template.md` (front matter, body, citation). The body is a list
of sections (intro, conversion notes, usage, model details, training, evaluation, any `extra_sections`), and
`eval_results` (huggingface_hub `EvalResult`s) go into the `model-index` metadata, so an evaluation section is
added by passing both: `push` reads the stored results of `diffembed evaluate` (`evaluation.card.stored_results`)
and hands them over that way.

A generated card ends in a marker holding a hash of its text. `is_replaceable_card` tells such a card, unedited
(or the placeholder template PEFT saves), from a hand-written or hand-edited one; jobs regenerate only the
former unless told to overwrite.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load

from . import __version__
from .model_folder import ADAPTER_CONFIG, CONFIG, folder_kind, is_hub_id, read_json, read_json_or_empty, weight_files
from .errors import PublishError
from .outputs import write_text
from .records import ConversionRecord, GgufSource, HeldoutEvaluation, TrainingRecord

TEMPLATE = "model_card_template.md"  # package data beside this module: front matter, body, citation
_MARKER = re.compile(r"\n<!-- diffembed-hf generated card, sha256 ([0-9a-f]{16}); "
                     r"edit it and it is kept as yours -->\n?$")

DEFAULT_LICENSE = "apache-2.0"
DEFAULT_LANGUAGE = ("en",)
CARD_TAGS = ("diffembed", "custom_code", "sentence-transformers", "feature-extraction", "sentence-similarity")
EXAMPLE_QUERY = "how do plants make energy?"
EXAMPLE_DOCUMENT = "Photosynthesis converts light energy into chemical energy stored in glucose."
CITATION = """@inproceedings{zhang-etal-2025-diffusion,
    title = "Diffusion vs. Autoregressive Language Models: A Text Embedding Perspective",
    author = "Zhang, Siyue and Zhao, Yilun and Geng, Liyuan and Cohan, Arman and Luu, Anh Tuan and Zhao, Chen",
    booktitle = "Proceedings of the 2025 Conference on Empirical Methods in Natural Language Processing",
    year = "2025",
    address = "Suzhou, China",
    publisher = "Association for Computational Linguistics",
    pages = "4273--4303",
    url = "https://aclanthology.org/2025.emnlp-main.213/",
}"""



def _json(path: Path):
    return read_json(path, PublishError)


def _json_or_empty(path: Path) -> dict:
    return read_json_or_empty(path, PublishError)


def _card_metadata(folder: Path) -> dict:
    readme = folder / "README.md"
    return (metadata_load(readme) or {}) if readme.is_file() else {}


def _training_record(folder: Path) -> TrainingRecord | None:
    return TrainingRecord.read(folder, PublishError)


def _conversion_record(folder: Path) -> ConversionRecord | None:
    return ConversionRecord.read(folder, PublishError)


def lineage_base_model(folder: str | Path, depth: int = 3) -> str | None:
    """The Hub id this folder descends from: its training record's base, its adapter's base, or the `base_model`
    of its own card (a converted folder names its source); a local base folder is followed up to `depth` levels."""
    folder = Path(folder)
    trained = (_training_record(folder) or TrainingRecord()).base_model
    adapter = _json_or_empty(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    converted = (_conversion_record(folder) or ConversionRecord()).hub_id
    for candidate in (trained, adapter, converted, _card_metadata(folder).get("base_model")):
        if is_hub_id(candidate):
            return candidate
    for candidate in (trained, adapter):
        if depth > 0 and isinstance(candidate, str) and Path(candidate).expanduser().is_dir():
            return lineage_base_model(Path(candidate).expanduser(), depth - 1)
    return None



def _fmt(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value) or "(none)"
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", "\\n")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _dataset_label(name: str) -> str:
    """A Hub dataset links to its page; a local file shows its name only (never the user's directories)."""
    return f"[{name}](https://huggingface.co/datasets/{name})" if is_hub_id(name) else f"`{Path(name).name}` (local)"


def _parameters(folder: Path, weights: list[str]) -> tuple[int, str]:
    """Parameter count and dtype(s), from the safetensors headers (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    count, dtypes = 0, set()
    for name in weights:
        if name.endswith(".safetensors"):
            try:
                with safe_open(folder / name, framework="pt") as handle:
                    for key in handle.keys():
                        tensor = handle.get_slice(key)
                        count += math.prod(tensor.get_shape())
                        dtypes.add(tensor.get_dtype())
            except (SafetensorError, OSError) as err:
                raise PublishError(f"{folder / name} is not a readable safetensors file ({err})") from None
    return count, "/".join(sorted(dtypes)).lower()


def _training_sections(record: TrainingRecord | None, base_label: str, repo_id: str = "MODEL") -> list[str]:
    if record is None:
        return [
            "## Training", "",
            f"No training record (`{TrainingRecord.FILE}`) came with this checkpoint: it has **not been fine-tuned "
            "with `diffembed train`**. Unless it was trained elsewhere, its weights are those of "
            f"{base_label}, not trained as an embedder; fine-tune it contrastively before relying on its "
            "embeddings.", "",
        ]
    lines = ["## Training", ""]
    datasets = record.datasets
    lines.append(f"Fine-tuned with `diffembed train` (diffembed-hf) from {base_label}"
                 + (f" on {', '.join(_dataset_label(d) for d in datasets)}" if datasets else "")
                 + (f" in {_duration(record.training_time_seconds)}" if record.training_time_seconds else "") + ".")
    lines.append("")
    ran = record.training
    if ran is not None and ran.steps:
        lines += [f"Ran {ran.steps:,} optimizer steps ({ran.samples:,} training pairs seen, "
                  f"{_fmt(ran.epochs)} epochs, {ran.devices} device(s))"
                  + (f"; loss {_fmt(ran.first_loss)} -> {_fmt(ran.final_loss)}" if ran.first_loss is not None else "")
                  + (f"; resumed from step {ran.resumed_from_step}" if ran.resumed_from_step else "")
                  + ".", ""]
    hyper = record.hyperparameters
    if hyper:
        lines += ["| hyper-parameter | value |", "|---|---|"]
        lines += [f"| {_fmt(name)} | {_fmt(value)} |" for name, value in hyper.items()]
        lines.append("")
    dims = hyper.get("matryoshka_dims")
    if dims:
        lines += ["### Matryoshka dimensions", "",
                  f"Trained with sentence-transformers' `MatryoshkaLoss` on the leading {_fmt(dims)} dimensions, so "
                  "a vector cut to one of them (and renormalised) keeps most of its quality:", "",
                  "```python",
                  f'model = SentenceTransformer("{repo_id}", trust_remote_code=True, truncate_dim={dims[-1]})',
                  "```", ""]
        if hyper.get("truncate_dim"):
            lines += [f"This folder stores `truncate_dim={hyper['truncate_dim']}`: sentence-transformers (>= 5.4) "
                      "returns that many dimensions unless told otherwise.", ""]
    if record.evaluation is not None and record.evaluation.metrics:
        lines += _heldout_lines(record.evaluation)
    return lines


def _heldout_lines(evaluation: HeldoutEvaluation) -> list[str]:
    before = evaluation.metrics_before_training or {}
    lines = ["## Evaluation", "", f"On {_fmt(evaluation.split)}:", ""]
    if before:
        lines += ["| metric | before training | after training |", "|---|---:|---:|"]
        lines += [f"| {_fmt(name)} | {_fmt(before[name]) if name in before else '-'} | {_fmt(value)} |"
                  for name, value in evaluation.metrics.items()]
    else:
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {_fmt(name)} | {_fmt(value)} |" for name, value in evaluation.metrics.items()]
    return [*lines, ""]


def _usage_model(repo_id: str, query_prompt: str | None, max_length: int) -> list[str]:
    prompt_line = f"query_prompt = {json.dumps(query_prompt, ensure_ascii=False)}" if query_prompt else ""
    query_text = f"query_prompt + {json.dumps(EXAMPLE_QUERY)}" if query_prompt else json.dumps(EXAMPLE_QUERY)
    return [
        "## Usage", "",
        "The model's code lives in this repository, so every loader needs `trust_remote_code=True` (without it "
        "sentence-transformers would silently build a causal model instead).", "",
        "### sentence-transformers", "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{repo_id}", trust_remote_code=True)',
        f"queries = model.encode_query([{json.dumps(EXAMPLE_QUERY)}])",
        f"documents = model.encode_document([{json.dumps(EXAMPLE_DOCUMENT)}])",
        "similarity = model.similarity(queries, documents)  # cosine",
        "print(similarity)",
        "```", "",
        ("`encode_query` puts the query prompt (below) in front of each query; documents carry no prompt. "
         "Other stored prompts are used with `model.encode(texts, prompt_name=...)`." if query_prompt else
         "No query prompt is stored with this model."), "",
        "### transformers", "",
        "```python",
        "import torch",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        f'model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
        *([prompt_line] if prompt_line else []),
        f"texts = [{query_text}, {json.dumps(EXAMPLE_DOCUMENT)}]",
        f'batch = tokenizer(texts, padding=True, truncation=True, max_length={max_length}, return_tensors="pt")',
        "with torch.no_grad():",
        "    embeddings = model(**batch).embeddings  # float32, L2-normalised",
        "print(embeddings[0] @ embeddings[1])  # cosine similarity",
        "```", "",
    ]


def _usage_adapter(repo_id: str, base: str) -> list[str]:
    return [
        "## Usage", "",
        f"This repository holds a LoRA adapter; the DiffEmbed model it adapts is [{base}](https://huggingface.co/"
        f"{base}), whose code needs `trust_remote_code=True`. Install `peft`.", "",
        "### sentence-transformers", "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        f'model = SentenceTransformer("{base}", trust_remote_code=True)',
        f'model.load_adapter("{repo_id}")',
        f"queries = model.encode_query([{json.dumps(EXAMPLE_QUERY)}])",
        f"documents = model.encode_document([{json.dumps(EXAMPLE_DOCUMENT)}])",
        "print(model.similarity(queries, documents))  # cosine",
        "```", "",
        "### transformers + PEFT", "",
        "```python",
        "import torch",
        "from peft import PeftModel",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        f'base = AutoModel.from_pretrained("{base}", trust_remote_code=True)',
        f'model = PeftModel.from_pretrained(base, "{repo_id}")  # or .merge_and_unload() for speed',
        f'tokenizer = AutoTokenizer.from_pretrained("{base}", trust_remote_code=True)',
        f"batch = tokenizer([{json.dumps(EXAMPLE_QUERY)}, {json.dumps(EXAMPLE_DOCUMENT)}], padding=True, "
        'return_tensors="pt")',
        "with torch.no_grad():",
        "    embeddings = model(**batch).embeddings  # float32, L2-normalised",
        "```", "",
        "Queries take the base model's query prompt (`encode_query` adds it).", "",
    ]


def _gguf_note(gguf: GgufSource | None) -> str:
    """A GGUF source's quantization, said plainly: a dequantized quantized model is not the original model."""
    if not gguf:
        return ""
    return (f" They were dequantized from the {gguf.quantization}-quantized GGUF file `{gguf.file}` "
            f"({gguf.architecture}): they carry its quantization error, and are not the original "
            "full-precision model's weights.")


def _conversion_sections(record: ConversionRecord) -> list[str]:
    lines = []
    if record.sliding_window is not None:
        lines += [f"**Sliding window ignored.** The source was trained with a {record.sliding_window}-token "
                  "sliding window; this model attends over the whole text, which matches the source only up to that "
                  "length.", ""]
    if record.gguf:
        gguf = record.gguf
        lines += [f"**From a quantized GGUF file.** Source `{gguf.file}`, quantization {gguf.quantization}"
                  f" (tensor types {_fmt(gguf.tensor_types)}), dequantized to {gguf.dequantized_to} by "
                  "transformers' GGUF loader.", ""]
    lines += ["## Conversion", "", "```bash", record.command, "```", "",
              f"Converted with diffembed-hf {record.version or __version__}.", ""]
    return lines


def build_model_card(
    folder: str | Path,
    repo_id: str | None = None,
    *,
    base_model: str | None = None,
    license: str | None = None,
    language: list[str] | None = None,
    eval_results: list[EvalResult] | None = None,
    extra_sections: Sequence[str] = (),
) -> ModelCard:
    """The model card of `folder` (published as `repo_id`; default: the folder's name): Hub metadata, pasteable
    usage, model details, conversion notes, training hyper-parameters and what ran, the evaluation table and
    the DiffEmbed citation.

    `base_model` (a Hub id) defaults to the folder's lineage: its training record, adapter config, conversion
    record or own card. `license` and `language` default to the folder's own card, then apache-2.0 and English.
    `eval_results` go into the `model-index` metadata and `extra_sections` (markdown) before the citation: the
    stored results of `diffembed evaluate` come this way (`evaluation.card.stored_results` reads them; `push`
    passes its `eval_results` and `lines`).
    """
    folder = Path(folder)
    repo_id = repo_id or folder.name
    kind = folder_kind(folder, PublishError)
    own = _card_metadata(folder)
    conversion = _conversion_record(folder)
    base_model = base_model or lineage_base_model(folder) or (conversion.hub_id if conversion else None)
    record = _training_record(folder)
    hub_datasets = [d for d in (record.datasets if record else []) if is_hub_id(d)]
    tags = list(CARD_TAGS) + (["peft", "lora"] if kind == "adapter" else [])
    name = repo_id.split("/")[-1]
    data = ModelCardData(
        library_name="peft" if kind == "adapter" else "sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=tags,
        base_model=base_model,
        datasets=hub_datasets or None,
        license=license or own.get("license") or DEFAULT_LICENSE,
        language=list(language or own.get("language") or DEFAULT_LANGUAGE),
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    base_label = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local checkpoint"
    sections: list[list[str]] = [[f"# {name}", ""]]
    if kind == "adapter":
        sections += _adapter_sections(folder, repo_id, base_model, base_label)
    else:
        sections += _model_sections(folder, repo_id, conversion, record, base_label)
    if not (conversion and record is None):
        sections.append(_training_sections(record, base_label, repo_id))
    sections += [[section.rstrip("\n"), ""] for section in extra_sections]
    text = _template().substitute(metadata=data.to_yaml(), citation=CITATION, version=__version__,
                                  body="\n".join(line for section in sections for line in section))
    return ModelCard(mark_generated(text))


def _adapter_sections(folder: Path, repo_id: str, base_model: str | None, base_label: str) -> list[list[str]]:
    """An adapter's card body: what it adapts, and how to load it."""
    sections: list[list[str]] = []
    adapter = _json(folder / ADAPTER_CONFIG)
    sections.append([
        f"A LoRA adapter (rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, on "
        f"{_fmt(sorted(adapter.get('target_modules') or []))}) for the [DiffEmbed](https://arxiv.org/abs/"
        f"2505.15045) text-embedding model {base_label}.", "",
    ])
    # a local base (an adapter just trained from a local folder) is named as the folder; push requires a Hub id
    sections.append(_usage_adapter(repo_id, base_model or Path(adapter["base_model_name_or_path"]).name))
    return sections


def _model_sections(folder: Path, repo_id: str, conversion: ConversionRecord | None, record: TrainingRecord | None,
                    base_label: str) -> list[list[str]]:
    """A model's card body: what it is, how to use it, its details and, if converted, where it came from."""
    sections: list[list[str]] = []
    config = _json(folder / CONFIG)
    st_config = _json_or_empty(folder / "sentence_bert_config.json")
    prompts = _json_or_empty(folder / "config_sentence_transformers.json").get("prompts") or {}
    max_length = st_config.get("max_seq_length") or config.get("max_position_embeddings")
    count, dtype = _parameters(folder, weight_files(folder))
    attention = "causal (the study's ablation)" if config.get("is_causal") else "bidirectional"
    intro = [
        f"A [DiffEmbed](https://arxiv.org/abs/2505.15045) text-embedding model: a language-model backbone "
        f"(a diffusion LM such as Dream in the study) run with {attention} attention, whose final-layer states "
        "(after the last RMSNorm) are mean-pooled over the real tokens and L2-normalised; texts are compared "
        "by cosine similarity.", "",
    ]
    if conversion and record is None:
        source_kind = ("a diffusion language model" if conversion.diffusion
                       else "an autoregressive LLM, now run with bidirectional attention")
        intro += [
            f"Its weights were converted from `{conversion.source}`: {conversion.family_title}, "
            f"{conversion.dtype} weights." + _gguf_note(conversion.gguf), "",
            f"**Not trained as an embedder.** The weights are those of {source_kind}, unchanged (the "
            "language-model head is dropped). Fine-tune it contrastively, as in the DiffEmbed study, before "
            "relying on its embeddings.", "",
        ]
    sections.append(intro)
    sections.append(_usage_model(repo_id, prompts.get("query"), max_length))
    details = [
        "## Model details", "",
        "| | |", "|---|---|",
        f"| base model | {base_label} |",
        f"| parameters | {count:,} ({dtype}) |",
        f"| layers / hidden size / heads (kv) | {config.get('num_hidden_layers')} / {config.get('hidden_size')} "
        f"/ {config.get('num_attention_heads')} ({config.get('num_key_value_heads')}) |",
        f"| embedding dimension | {config.get('hidden_size')} |",
        f"| max sequence length | {max_length} tokens |",
        f"| pooling | {config.get('pooling', 'mean')}, prompt tokens included; L2-normalised |",
        f"| prompts | {_fmt(sorted(prompts)) if prompts else '(none)'} |",
        "",
    ]
    if prompts.get("query"):
        details += ["Query prompt:", "", "```text", prompts["query"].rstrip("\n"), "```", ""]
    sections.append(details)
    if conversion:
        sections.append(_conversion_sections(conversion))
    return sections


def _template() -> Template:
    return Template(resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8"))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def mark_generated(text: str) -> str:
    """`text` with the marker that identifies an unedited generated card."""
    text = text.rstrip("\n") + "\n"
    return f"{text}\n<!-- diffembed-hf generated card, sha256 {_digest(text)}; edit it and it is kept as yours -->\n"


def is_generated_card(text: str) -> bool:
    """True for a card this builder wrote and nobody edited since (its marker's hash matches its text)."""
    match = _MARKER.search(text)
    return bool(match) and _digest(text[: match.start()]) == match.group(1)


def is_replaceable_card(text: str) -> bool:
    """A card no person wrote: this builder's (unedited), or the untouched template that PEFT's and
    huggingface_hub's `save_pretrained` leave ("[More Information Needed]" placeholders)."""
    return is_generated_card(text) or "[More Information Needed]" in text


def write_model_card(folder: str | Path, *, overwrite: bool = False, **kwargs) -> Path | None:
    """Write `folder/README.md` from `build_model_card(folder, **kwargs)`; a hand-written README.md is kept
    (returns None) unless `overwrite`."""
    readme = Path(folder) / "README.md"
    if readme.is_file() and not overwrite and not is_replaceable_card(readme.read_text(encoding="utf-8")):
        return None
    write_text(readme, str(build_model_card(folder, **kwargs)))
    return readme
