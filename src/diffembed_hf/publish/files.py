"""What a push sends: the file selection of a DiffEmbed folder or LoRA adapter folder, checked before anything else.

Safetensors weights, the two remote-code files, the tokenizer, the sentence-transformers files and licence
files; pickles, training checkpoints, caches and `.git` never leave the machine. Every problem is a
`PublishError` naming the folder and what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..errors import DiffembedError, UsageError

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


class PublishError(DiffembedError):
    """A folder that cannot be pushed, a failed validation, or a failed upload (exit status 1)."""


class PublishUsageError(PublishError, UsageError):
    """A wrong repo id, token, option or path, found before any work (exit status 2)."""


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
        raise PublishUsageError(f"{folder} is not a folder")
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


def _is_hub_id(name: Any) -> bool:
    """A "namespace/name" Hub id that is not also a local path (a relative output folder can look like one)."""
    if not isinstance(name, str) or name.count("/") != 1 or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True
