"""Publish a DiffEmbed folder (or a LoRA adapter) to the Hugging Face Hub, with a model card, in one commit.

A push sends exactly what a user needs and nothing else: safetensors weights, the two remote-code files, the
tokenizer, the sentence-transformers files, licence files and a generated `README.md`. Pickles, training
checkpoints, caches and `.git` never leave the machine. Before anything is sent:

  * the folder is checked (a DiffEmbed config with `auto_map`, its code files, weights, tokenizer, modules.json),
    the repo id is validated and a token is found (`token=`, `HF_TOKEN`, then the login cache): these fail with
    a clear `PublishError` before any network call;
  * the files are staged (links to the folder's files plus the generated card) in a temporary folder, and that
    staged folder is loaded in a fresh offline process that cannot import this package, through `AutoModel` and
    `SentenceTransformer` with `trust_remote_code=True`; the push is refused unless both load, give finite unit
    vectors and agree. What was validated is exactly what is uploaded.

The user's folder is never written to (unless `write_card=True` asks for the card to be saved there). The upload
uses huggingface_hub's own client (`create_repo`, `create_branch`, `create_commit`), so `HF_ENDPOINT`,
`HF_TOKEN` and the login cache work as with every Hugging Face tool. `create_commit` is used rather than
`upload_folder` because, with `hf_xet` installed, huggingface_hub 2.x turns `upload_folder` into a multi-commit
pipeline; one explicit commit keeps a push atomic. Files already on the Hub with the same content are dropped
from the commit by the client, so pushing an unchanged folder again creates no commit at all.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    ModelCardData,
    get_token,
    metadata_load,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import HFValidationError, validate_repo_id

try:  # huggingface_hub >= 2 runs on httpx2, 1.x on httpx: transport errors (refused connection...) come from there
    from httpx2 import HTTPError as _TransportError
except ImportError:
    from httpx import HTTPError as _TransportError

from . import __version__

logger = logging.getLogger(__name__)

TRAINING_METADATA = "diffembed_training.json"  # written by `diffembed train`; read for the card, not uploaded
REMOTE_CODE_FILES = ("configuration_diffembed.py", "modeling_diffembed.py")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "NOTICE.txt")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Files an earlier push may have left on the Hub that would shadow or contradict the pushed weights (a stale
# model.safetensors beside new shards is loaded first; a stale adapter_config.json turns a model into an adapter).
STALE_ON_HUB = {
    "model": ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
              "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.*"),
    "adapter": ("adapter_model.*",),
}
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


class PublishError(Exception):
    """A folder, token or repo id that cannot be pushed, a failed validation, or a failed upload."""


# ----------------------------------------------------------------------------------------------------------
# What a folder holds
# ----------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PublishError(f"{path} cannot be read as JSON: {err}") from err


def _read_json_or_empty(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}


def _present(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if (folder / name).is_file()]


def _files_under(folder: Path, subdir: str) -> list[str]:
    """Every regular file below `folder/subdir`, as posix paths relative to `folder`; refuses pickles."""
    files = sorted(p.relative_to(folder).as_posix() for p in (folder / subdir).rglob("*") if p.is_file())
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PublishError(f"{folder / subdir} holds pickled files ({', '.join(pickles)}); pickles are never "
                           "pushed. Re-save the module with safetensors.")
    return [f for f in files if "__pycache__" not in f and not Path(f).name.startswith(".")]


def _code_files(folder: Path, auto_map: Any, source: str) -> list[str]:
    """The `.py` files that an `auto_map` ("module.Class", or a list of them for tokenizers) names."""
    entries = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    names = set()
    for entry in entries:
        for ref in entry if isinstance(entry, list) else [entry]:
            if isinstance(ref, str) and "--" not in ref and "." in ref:  # "repo--module.Class" lives elsewhere
                names.add(ref.rsplit(".", 1)[0] + ".py")
    missing = sorted(name for name in names if not (folder / name).is_file())
    if missing:
        raise PublishError(f"{folder}: {source} auto_map needs {', '.join(missing)}, which the folder lacks")
    return sorted(names)


def _weight_files(folder: Path) -> list[str]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file() and index.is_file():
        raise PublishError(f"{folder} holds both model.safetensors and model.safetensors.index.json; "
                           "remove the stale one so that the Hub copy loads the weights you mean")
    if single.is_file():
        return [single.name]
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise PublishError(f"{index} names shards that are missing: {', '.join(missing) or '(none listed)'}")
        return [index.name, *shards]
    if any(folder.glob("pytorch_model*.bin")):
        raise PublishError(f"{folder} has only pickled weights (pytorch_model*.bin), which are never pushed; "
                           "re-save them with save_pretrained() (safetensors)")
    raise PublishError(f"{folder} has no weights (model.safetensors or model.safetensors.index.json)")


def _model_files(folder: Path) -> list[str]:
    """The files of a full DiffEmbed folder that a push sends, or a PublishError naming what is wrong."""
    config = _read_json(folder / "config.json")
    if config.get("model_type") != "diffembed":
        raise PublishError(f"{folder / 'config.json'} has model_type={config.get('model_type')!r}: {folder} is not "
                           "a DiffEmbed checkpoint (convert it first with `diffembed convert`)")
    auto_map = config.get("auto_map") or {}
    if not {"AutoConfig", "AutoModel"} <= set(auto_map):
        raise PublishError(f"{folder / 'config.json'} has no auto_map for AutoConfig and AutoModel: Hub users "
                           "could not load it with trust_remote_code. Re-save it with diffembed_hf imported.")
    missing_code = [name for name in REMOTE_CODE_FILES if not (folder / name).is_file()]
    if missing_code:
        raise PublishError(f"{folder} lacks the remote-code file(s) {', '.join(missing_code)}; "
                           "save_pretrained() with diffembed_hf imported copies them")
    files = ["config.json", *_present(folder, ("generation_config.json",)), *REMOTE_CODE_FILES,
             *_code_files(folder, auto_map, "config.json"), *_weight_files(folder)]

    tokenizer = _present(folder, TOKENIZER_FILES)
    if not {"tokenizer.json", "tokenizer_config.json"} & set(tokenizer):
        raise PublishError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json); save it beside "
                           "the model (tokenizer.save_pretrained)")
    files += tokenizer
    if (folder / "tokenizer_config.json").is_file():
        files += _code_files(folder, _read_json(folder / "tokenizer_config.json").get("auto_map") or {},
                             "tokenizer_config.json")

    if not (folder / "modules.json").is_file():
        raise PublishError(f"{folder} has no modules.json, so sentence-transformers would build it without its "
                           "Normalize step; add the files with diffembed_hf.sentence_transformer."
                           "write_sentence_transformer_files(folder)")
    files += _present(folder, SENTENCE_TRANSFORMERS_FILES)
    for module in _read_json(folder / "modules.json"):
        path = module.get("path", "")
        if not path:
            continue
        if (folder / path).is_dir():
            files += _files_under(folder, path)
        elif not module.get("type", "").endswith("Normalize"):  # Normalize keeps no files: git drops its folder
            raise PublishError(f"{folder}: modules.json names the module folder {path!r}, which is missing")
    return sorted(set(files + _present(folder, LICENSE_FILES)))


def _adapter_files(folder: Path) -> list[str]:
    """The files of a LoRA adapter folder that a push sends: adapter config and weights, tokenizer, licences."""
    config = _read_json(folder / ADAPTER_CONFIG)
    if not config.get("peft_type") or not config.get("base_model_name_or_path"):
        raise PublishError(f"{folder / ADAPTER_CONFIG} is not a PEFT adapter config with a base model "
                           "(peft_type and base_model_name_or_path are required)")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise PublishError(f"{folder} has no {ADAPTER_WEIGHTS}" + (" (only adapter_model.bin, a pickle, which is "
                           "never pushed; re-save it with safetensors)" if pickled else ""))
    return sorted({ADAPTER_CONFIG, ADAPTER_WEIGHTS, *_present(folder, TOKENIZER_FILES),
                   *_present(folder, LICENSE_FILES)})


def folder_kind(folder: str | Path) -> str:
    """"model" for a full DiffEmbed folder, "adapter" for a PEFT adapter folder; PublishError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    has_model, has_adapter = (folder / "config.json").is_file(), (folder / ADAPTER_CONFIG).is_file()
    if has_model and has_adapter:
        raise PublishError(f"{folder} holds both a model (config.json) and an adapter ({ADAPTER_CONFIG}); "
                           "transformers would load it as the adapter. Remove the one you do not mean to push.")
    if has_model:
        return "model"
    if has_adapter:
        return "adapter"
    raise PublishError(f"{folder} is not a DiffEmbed checkpoint: it has no config.json (nor {ADAPTER_CONFIG})")


def files_to_push(folder: str | Path) -> list[str]:
    """The paths (relative to `folder`) a push sends besides README.md; PublishError if the folder cannot be pushed."""
    folder = Path(folder)
    return _model_files(folder) if folder_kind(folder) == "model" else _adapter_files(folder)


def _training_record(folder: Path) -> dict | None:
    return _read_json_or_empty(folder / TRAINING_METADATA) or None


# ----------------------------------------------------------------------------------------------------------
# Hub ids and card metadata
# ----------------------------------------------------------------------------------------------------------


def _is_hub_id(name: Any) -> bool:
    """A "namespace/name" Hub id that is not also a local path (a relative output folder can look like one)."""
    if not isinstance(name, str) or name.count("/") != 1 or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _card_metadata(folder: Path) -> dict:
    readme = folder / "README.md"
    return (metadata_load(readme) or {}) if readme.is_file() else {}


def _lineage_base_model(folder: Path, depth: int = 3) -> str | None:
    """The Hub id this folder descends from: its training record's base, its adapter's base, or the `base_model`
    of its own card (a converted folder names its source); a local base folder is followed up to `depth` levels."""
    record = _training_record(folder) or {}
    adapter = _read_json_or_empty(folder / ADAPTER_CONFIG)
    for candidate in (record.get("base_model"), adapter.get("base_model_name_or_path"),
                      _card_metadata(folder).get("base_model")):
        if _is_hub_id(candidate):
            return candidate
    for candidate in (record.get("base_model"), adapter.get("base_model_name_or_path")):
        if depth > 0 and isinstance(candidate, str) and Path(candidate).expanduser().is_dir():
            return _lineage_base_model(Path(candidate).expanduser(), depth - 1)
    return None


def _local_base_path(base: str) -> Path | None:
    """A base model folder available without the network: a local folder, or a Hub id in the local cache."""
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser()
    if not _is_hub_id(base):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(base, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError):
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
    return f"[{name}](https://huggingface.co/datasets/{name})" if _is_hub_id(name) else f"`{Path(name).name}` (local)"


def _parameters(folder: Path, weights: list[str]) -> tuple[int, str]:
    """Parameter count and dtype(s), from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    count, dtypes = 0, set()
    for name in weights:
        if name.endswith(".safetensors"):
            with safe_open(folder / name, framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    count += math.prod(tensor.get_shape())
                    dtypes.add(tensor.get_dtype())
    return count, "/".join(sorted(dtypes)).lower()


def _training_sections(record: dict | None, base_label: str) -> list[str]:
    if record is None:
        return [
            "## Training", "",
            f"No training record (`{TRAINING_METADATA}`) came with this checkpoint: it has **not been fine-tuned "
            "with `diffembed train`**. Unless it was trained elsewhere, its weights are those of "
            f"{base_label}, not trained as an embedder; fine-tune it contrastively before relying on its "
            "embeddings.", "",
        ]
    lines = ["## Training", ""]
    datasets = record.get("datasets") or []
    lines.append(f"Fine-tuned with `diffembed train` (diffembed-hf) from {base_label}"
                 + (f" on {', '.join(_dataset_label(d) for d in datasets)}" if datasets else "")
                 + (f" in {_duration(record['training_time_seconds'])}" if record.get("training_time_seconds")
                    else "") + ".")
    lines.append("")
    hyper = record.get("hyperparameters") or {}
    if hyper:
        lines += ["| hyper-parameter | value |", "|---|---|"]
        lines += [f"| {_fmt(name)} | {_fmt(value)} |" for name, value in hyper.items()]
        lines.append("")
    evaluation = record.get("evaluation")
    if evaluation and evaluation.get("metrics"):
        before = evaluation.get("metrics_before_training") or {}
        lines += ["## Evaluation", "", f"On {_fmt(evaluation.get('split', 'the held-out split'))}:", ""]
        if before:
            lines += ["| metric | before training | after training |", "|---|---:|---:|"]
            lines += [f"| {_fmt(name)} | {_fmt(before[name]) if name in before else '-'} | {_fmt(value)} |"
                      for name, value in evaluation["metrics"].items()]
        else:
            lines += ["| metric | value |", "|---|---:|"]
            lines += [f"| {_fmt(name)} | {_fmt(value)} |" for name, value in evaluation["metrics"].items()]
        lines.append("")
    return lines


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


def _evaluation(folder: str | Path | None):
    """Results stored by `diffembed evaluate` (evaluation.card), or None."""
    if folder is None:
        return None
    from .evaluation import EvaluationError
    from .evaluation.card import card_results

    try:
        return card_results(folder)
    except EvaluationError as err:
        raise PublishError(str(err)) from None


def build_model_card(
    folder: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    language: list[str] | None = None,
    eval_results: str | Path | None = None,
) -> ModelCard:
    """The model card for pushing `folder` to `repo_id`: Hub metadata, pasteable usage, model details, training
    hyper-parameters and evaluation (from `diffembed_training.json`) and the DiffEmbed citation.

    `base_model` (a Hub id) defaults to the folder's lineage: its training record, adapter config or own card.
    `license` and `language` default to the folder's own card, then to apache-2.0 and English. `eval_results` (a
    `diffembed evaluate --output` folder, default FOLDER/eval when present) adds a results table and model-index.
    """
    folder = Path(folder)
    kind = folder_kind(folder)
    evaluation = _evaluation(eval_results or (folder / "eval" if (folder / "eval").is_dir() else None))
    own = _card_metadata(folder)
    base_model = base_model or _lineage_base_model(folder)
    record = _training_record(folder)
    hub_datasets = [d for d in (record or {}).get("datasets") or [] if _is_hub_id(d)]
    tags = list(CARD_TAGS) + (["peft", "lora"] if kind == "adapter" else [])
    data = ModelCardData(
        library_name="peft" if kind == "adapter" else "sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=tags,
        base_model=base_model,
        datasets=hub_datasets or None,
        license=license or own.get("license") or DEFAULT_LICENSE,
        language=list(language or own.get("language") or DEFAULT_LANGUAGE),
        eval_results=evaluation.eval_results if evaluation else None,
        model_name=repo_id.split("/")[-1] if evaluation else None,
    )
    base_label = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local checkpoint"
    name = repo_id.split("/")[-1]
    lines = [f"# {name}", ""]
    if kind == "adapter":
        adapter = _read_json(folder / ADAPTER_CONFIG)
        if not base_model:
            raise PublishError("an adapter's card must name the Hub id of its base model (base_model=...)")
        lines += [
            f"A LoRA adapter (rank {adapter.get('r')}, alpha {adapter.get('lora_alpha')}, on "
            f"{_fmt(sorted(adapter.get('target_modules') or []))}) for the [DiffEmbed](https://arxiv.org/abs/"
            f"2505.15045) text-embedding model {base_label}.", "",
            *_usage_adapter(repo_id, base_model),
        ]
    else:
        config = _read_json(folder / "config.json")
        st_config = _read_json_or_empty(folder / "sentence_bert_config.json")
        prompts = _read_json_or_empty(folder / "config_sentence_transformers.json").get("prompts") or {}
        max_length = st_config.get("max_seq_length") or config.get("max_position_embeddings")
        count, dtype = _parameters(folder, _weight_files(folder))
        attention = "causal (the study's ablation)" if config.get("is_causal") else "bidirectional"
        lines += [
            f"A [DiffEmbed](https://arxiv.org/abs/2505.15045) text-embedding model: a language-model backbone "
            f"(a diffusion LM such as Dream in the study) run with {attention} attention, whose final-layer states "
            "(after the last RMSNorm) are mean-pooled over the real tokens and L2-normalised; texts are compared "
            "by cosine similarity.", "",
            *_usage_model(repo_id, prompts.get("query"), max_length),
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
            lines += ["Query prompt:", "", "```text", prompts["query"].rstrip("\n"), "```", ""]
    lines += _training_sections(record, base_label)
    lines += evaluation.lines if evaluation else []
    lines += [
        "## Citation", "",
        "The DiffEmbed study:", "",
        "```bibtex", CITATION, "```", "",
        f"Pushed with diffembed-hf {__version__}.", "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


# ----------------------------------------------------------------------------------------------------------
# Validation in a fresh process
# ----------------------------------------------------------------------------------------------------------

# Runs in a fresh interpreter that cannot import diffembed_hf, offline: what a Hub user has after downloading.
_VALIDATE_SCRIPT = r"""
import json, sys
sys.modules["diffembed_hf"] = None
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer

folder, base, out = sys.argv[1], sys.argv[2] or None, sys.argv[3]
texts = ["What is the capital of France?", "Paris is the capital and largest city of France."]
device = "cuda" if torch.cuda.is_available() else "cpu"

def fail(message):
    sys.exit("VALIDATION FAILED: " + message)

def step(name, run):
    try:
        return run()
    except FloatingPointError as err:  # the model refuses to return a NaN embedding
        fail(f"{name}: the embeddings are not finite ({err})")
    except Exception as err:
        import traceback
        traceback.print_exc()
        fail(f"{name} raised {type(err).__name__}: {err}")

def auto_model():
    model = AutoModel.from_pretrained(base or folder, trust_remote_code=True).to(device).eval()
    module = type(model).__module__
    if not module.startswith("transformers_modules"):
        fail(f"AutoModel built {type(model).__name__} from {module}, not from the folder's remote code")
    dtype = str(next(model.parameters()).dtype)
    if base:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(base or folder, trust_remote_code=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        return model(**batch).embeddings.float().cpu(), module, dtype

def sentence_transformer():
    st = SentenceTransformer(base or folder, trust_remote_code=True, device=device)
    if base:
        st.load_adapter(folder)
    return st.encode(texts, convert_to_tensor=True).float().cpu()

auto, module, dtype = step("AutoModel", auto_model)  # one model in memory at a time
sentence = step("SentenceTransformer", sentence_transformer)
if not (torch.isfinite(auto).all() and torch.isfinite(sentence).all()):
    fail("the embeddings are not finite (NaN or inf)")
norms = sentence.norm(dim=-1)
if not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
    fail(f"SentenceTransformer's embeddings are not unit vectors (norms {norms.tolist()}): degenerate weights?")
difference = (F.normalize(auto, dim=-1) - sentence).abs().max().item()
tolerance = 1e-5 if dtype == "torch.float32" else 2e-2
if difference > tolerance:
    fail(f"AutoModel and SentenceTransformer disagree by {difference:.2e} (> {tolerance:g})")
with open(out, "w") as handle:
    json.dump({"module": module, "dtype": dtype, "dimension": sentence.shape[1], "max_difference": difference}, handle)
"""


def validate_folder(folder: str | Path, *, base_model_path: str | Path | None = None, timeout: float = 3600) -> dict:
    """Load `folder` as a Hub user would and refuse it unless it works: in a fresh offline process that cannot
    import diffembed_hf, through `AutoModel` and `SentenceTransformer` (`trust_remote_code=True`), embedding two
    texts; both must give finite unit vectors that agree (1e-5 in float32). For an adapter folder,
    `base_model_path` is its base model's local folder, loaded first with the adapter applied by PEFT.

    Returns what was checked (remote-code module, dtype, dimension, largest difference); raises PublishError.
    """
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="diffembed-validate-") as tmp:
        out = Path(tmp) / "report.json"
        # a private modules cache: the folder's own code is what runs, never a stale copy from an earlier load
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(Path(tmp) / "mods"))
        command = [sys.executable, "-c", _VALIDATE_SCRIPT, str(folder), str(base_model_path or ""), str(out)]
        logger.info("Validating %s in a fresh process (AutoModel and SentenceTransformer, offline)", folder)
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise PublishError(f"Validating {folder} did not finish in {timeout:.0f} s") from err
        if result.returncode:
            lines = result.stderr.strip().splitlines()
            logger.debug("Validation output:\n%s", result.stderr)
            reason = next((line for line in reversed(lines) if line.startswith("VALIDATION FAILED")), None)
            raise PublishError(
                f"{folder} does not load as a Hub user would load it, so it was not pushed: "
                + (reason or "\n" + "\n".join(lines[-25:]))
            )
        return json.loads(out.read_text())


# ----------------------------------------------------------------------------------------------------------
# Plan (stage + card + validation) and upload
# ----------------------------------------------------------------------------------------------------------


@dataclass
class PushPlan:
    """What a push sends: `staging` holds links to the folder's files and the generated ones (README.md, a
    rewritten adapter_config.json), exactly the tree the Hub repo will get. Use as a context manager (or call
    `cleanup`) to remove the staging folder."""

    folder: Path
    repo_id: str
    kind: str
    staging: Path
    card: ModelCard
    generated: list[str]
    validation: dict | None
    notes: list[str] = field(default_factory=list)
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    @property
    def paths(self) -> list[str]:
        return sorted(p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*") if p.is_file())

    def describe(self) -> str:
        """A listing of the files and their origin, for dry runs and logs."""
        lines = [f"{len(self.paths)} files for {self.repo_id} ({self.kind}) from {self.folder}:"]
        for path in self.paths:
            origin = "generated" if path in self.generated else "folder"
            lines.append(f"  {path:<48} {(self.staging / path).stat().st_size:>14,} B  {origin}")
        if self.validation is None:
            lines.append("validation: SKIPPED (not loaded before pushing)")
        else:
            lines.append(f"validation: passed (AutoModel + SentenceTransformer in a fresh offline process; "
                         f"{self.validation.get('dtype')}, dimension {self.validation.get('dimension')}, "
                         f"max difference {self.validation.get('max_difference', 0):.1e})")
        lines += self.notes
        return "\n".join(lines)

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> PushPlan:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def _merge(adapter_folder: Path, base_path: Path, output: Path) -> None:
    """Merge a LoRA adapter into its base (PEFT's merge_and_unload) and save a standalone DiffEmbed folder:
    the base folder's tokenizer and sentence-transformers files, then the adapter folder's own, then the model."""
    from peft import PeftModel

    from .modeling.modeling_diffembed import DiffEmbedForEmbedding

    for source in (base_path, adapter_folder):
        for name in (*TOKENIZER_FILES, *SENTENCE_TRANSFORMERS_FILES, *LICENSE_FILES):
            if (source / name).is_file():
                shutil.copy2(source / name, output / name)
        modules = source / "modules.json"
        for module in _read_json(modules) if modules.is_file() else []:
            if module.get("path") and (source / module["path"]).is_dir():
                shutil.copytree(source / module["path"], output / module["path"], dirs_exist_ok=True)
    if (adapter_folder / TRAINING_METADATA).is_file():  # the adapter's training, never the base's own record
        shutil.copy2(adapter_folder / TRAINING_METADATA, output / TRAINING_METADATA)
    base = DiffEmbedForEmbedding.from_pretrained(base_path)
    merged = PeftModel.from_pretrained(base, adapter_folder).merge_and_unload()
    merged.save_pretrained(output)
    logger.info("Merged the adapter %s into %s", adapter_folder, base_path)


def prepare_push(
    folder: str | Path,
    repo_id: str,
    *,
    merge_adapter: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    language: list[str] | None = None,
    card: str | Path | None = None,
    validate: bool = True,
    eval_results: str | Path | None = None,
) -> PushPlan:
    """Check `folder`, build its card and stage the upload, then validate the staged tree (see module doc).

    An adapter folder is pushed as an adapter whose card and adapter_config.json name its base model by Hub id
    (`base_model`, required when the adapter's base is a local folder), or, with `merge_adapter=True`, merged
    into its base (a local folder or a cached Hub id) and pushed as a standalone model. `card` pushes that file
    as README.md instead of the generated card. Adapters are validated by loading their base offline with the
    adapter applied; when the base is not available offline the push is refused unless `validate=False`.
    """
    folder = Path(folder).expanduser().resolve()
    kind = folder_kind(folder)
    if merge_adapter and kind != "adapter":
        raise PublishError(f"merge_adapter=True needs a LoRA adapter folder; {folder} is a full model")
    tmp = tempfile.TemporaryDirectory(prefix="diffembed-push-")
    try:
        staging, notes, generated, base_path = Path(tmp.name) / "repo", [], [], None
        source = folder
        if kind == "adapter":
            adapter = _read_json(folder / ADAPTER_CONFIG)
            base_path = _local_base_path(adapter["base_model_name_or_path"])
            if merge_adapter:
                if base_path is None:
                    raise PublishError(f"Cannot merge: the adapter's base {adapter['base_model_name_or_path']!r} "
                                       "is neither a local folder nor in the Hugging Face cache")
                if folder_kind(base_path) != "model":
                    raise PublishError(f"Cannot merge: the adapter's base {base_path} is not a DiffEmbed model")
                source = Path(tmp.name) / "merged"
                source.mkdir()
                _merge(folder, base_path, source)
                kind, base_path = "model", None
                notes.append(f"merged: the adapter was merged into {adapter['base_model_name_or_path']}")
            else:
                base_model = base_model or (adapter["base_model_name_or_path"]
                                            if _is_hub_id(adapter["base_model_name_or_path"]) else None)
                if base_model is None:
                    raise PublishError(
                        f"The adapter's base model is the local folder {adapter['base_model_name_or_path']!r}, "
                        "which Hub users cannot load: pass base_model= (--base-model) with the Hub id where that "
                        "base is published, or merge_adapter=True (--merge) to push a standalone model")
                if not _is_hub_id(base_model):
                    raise PublishError(f"base_model={base_model!r} is not a Hub id (namespace/name)")

        files = files_to_push(source)
        for rel in files:
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(source / rel, staging / rel)  # no copy of multi-GB weights
            except OSError:  # a filesystem (or Windows account) without symbolic links
                shutil.copy2(source / rel, staging / rel)
        if kind == "adapter" and adapter["base_model_name_or_path"] != base_model:
            # Hub users' PEFT and transformers load the base from here: it must be the Hub id, not a local path
            (staging / ADAPTER_CONFIG).unlink()
            (staging / ADAPTER_CONFIG).write_text(
                json.dumps({**adapter, "base_model_name_or_path": base_model}, indent=2) + "\n", encoding="utf-8")
            generated.append(ADAPTER_CONFIG)
            notes.append(f"adapter_config.json: base_model_name_or_path rewritten to {base_model!r}")

        if card is not None:
            if not Path(card).is_file():
                raise PublishError(f"card={str(card)!r} is not a file")
            model_card = ModelCard.load(Path(card))
            notes.append(f"README.md: {card} as given")
        else:
            # the lineage is read from the user's folder: a merged copy has lost its adapter config
            model_card = build_model_card(source, repo_id, base_model=base_model or _lineage_base_model(folder),
                                          license=license, language=language, eval_results=eval_results
                                          or (folder / "eval" if (folder / "eval").is_dir() else None))
        (staging / "README.md").write_text(str(model_card), encoding="utf-8")
        generated.append("README.md")

        validation = None
        if validate:
            if kind == "adapter" and base_path is None:
                raise PublishError(
                    f"Cannot validate the adapter: its base {adapter['base_model_name_or_path']!r} is not available "
                    "offline (a local folder or the Hugging Face cache). Download it first, or pass "
                    "validate=False (--skip-validation) to push it unvalidated.")
            validation = validate_folder(staging, base_model_path=base_path)
        return PushPlan(folder, repo_id, kind, staging, model_card, generated, validation, notes, tmp)
    except BaseException:
        tmp.cleanup()
        raise


def _check_repo_id(repo_id: str) -> None:
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PublishError(f"Invalid repo id {repo_id!r}: {err}") from err


def _stale_on_hub(remote: list[str], kind: str, pushed: list[str]) -> list[str]:
    patterns = STALE_ON_HUB[kind]
    return sorted(path for path in remote if "/" not in path and path not in pushed
                  and any(fnmatch.fnmatch(path, pattern) for pattern in patterns))


def upload(
    plan: PushPlan,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Send a prepared plan in one commit: create the repo (exist_ok) and the branch if needed, delete weight
    files an earlier push left that would shadow the new ones, then commit. A failure is raised as PublishError
    naming the step; a Hub commit is atomic, so nothing is half-pushed and re-running resumes cleanly."""
    api = HfApi(endpoint=endpoint, token=token, library_name="diffembed-hf", library_version=__version__)
    repo_id, step = plan.repo_id, "creating the repository"
    message = commit_message or (f"Upload DiffEmbed {'LoRA adapter' if plan.kind == 'adapter' else 'model'} "
                                 f"with diffembed-hf {__version__}")
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and not create_pr and not revision.startswith("refs/pr/"):
            step = f"creating the branch {revision!r}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        step = "listing the files already on the Hub"
        stale = _stale_on_hub(api.list_repo_files(repo_id, revision=revision), plan.kind, plan.paths)
        operations = [CommitOperationDelete(path_in_repo=path) for path in stale]
        operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(plan.staging / path))
                       for path in plan.paths]
        step = "committing"
        logger.info("Pushing %d files to %s%s%s", len(plan.paths), repo_id, f"@{revision}" if revision else "",
                    " as a pull request" if create_pr else "")
        if stale:
            logger.info("Deleting stale weight files on the Hub: %s", ", ".join(stale))
        info = api.create_commit(
            repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr,
            commit_description=(f"{len(plan.paths)} files from diffembed-hf {__version__}; "
                                + ("validated offline with AutoModel and SentenceTransformer (trust_remote_code)."
                                   if plan.validation else "not validated before pushing.")),
        )
    except (OSError, _TransportError, ValueError) as err:
        raise PublishError(
            f"Pushing {plan.folder} to {repo_id} failed while {step}: {err}\nNothing was committed (a Hub commit "
            f"is atomic) and {plan.folder} is unchanged; run the same push again to retry."
        ) from err
    logger.info("Pushed %s to %s", plan.folder, info.pr_url or info.commit_url)
    return info


def push(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    merge_adapter: bool = False,
    endpoint: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    language: list[str] | None = None,
    card: str | Path | None = None,
    write_card: bool = False,
    validate: bool = True,
    eval_results: str | Path | None = None,
) -> CommitInfo | list[str]:
    """Push a DiffEmbed folder (or LoRA adapter) to the Hub in one commit, after checking and validating it.

    The repo id, the folder and the token (`token`, else `HF_TOKEN`, else the login cache) are checked before any
    network call. `private=None` keeps the Hub's default (public unless the organisation says otherwise) and is
    ignored for an existing repo. `revision` is a branch (created if missing) or `refs/pr/N`; `create_pr` opens a
    pull request against it. `endpoint` defaults to `HF_ENDPOINT`. `dry_run=True` does everything but the upload
    and returns the paths that would be sent. `write_card=True` also saves the card as `folder/README.md`.
    See `prepare_push` for adapters, `merge_adapter`, `base_model` and `card`.
    """
    _check_repo_id(repo_id)
    if create_pr and revision and revision.startswith("refs/pr/"):
        raise PublishError(f"create_pr=True opens a new pull request; revision={revision!r} already is one")
    if not dry_run:
        if hf_constants.HF_HUB_OFFLINE:
            raise PublishError("HF_HUB_OFFLINE is set, so huggingface_hub refuses every request; unset it to push")
        token = token or get_token()
        if not token:
            raise PublishError("No Hugging Face token: set HF_TOKEN, log in with `hf auth login`, or pass token= "
                               "(--token). Pushing needs a token with write access.")
    with prepare_push(folder, repo_id, merge_adapter=merge_adapter, base_model=base_model, license=license,
                      language=language, card=card, validate=validate, eval_results=eval_results) as plan:
        logger.info("%s", plan.describe())
        if write_card:
            (plan.folder / "README.md").write_text(str(plan.card), encoding="utf-8")
            logger.info("Wrote the model card to %s", plan.folder / "README.md")
        if dry_run:
            return plan.paths
        return upload(plan, token=token, private=private, revision=revision, create_pr=create_pr,
                      commit_message=commit_message, endpoint=endpoint)
