"""What a push sends: the file selection of a DiffEmbed folder or LoRA adapter folder, checked before anything else.

Safetensors weights, the two remote-code files, the tokenizer, the sentence-transformers files and licence
files; pickles, training checkpoints, caches, outputs written inside the folder and `.git` never leave the
machine. The folder is untrusted input: every path its metadata names must stay inside it and no link may
lead out of it (`checkpoint.check_folder`). Every problem is a `PublishError` naming the folder and what is
wrong.
"""

from __future__ import annotations

from pathlib import Path

from ..model_folder import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CONFIG,
    LICENSE_PATTERNS,
    PICKLE_SUFFIXES,
    REMOTE_CODE_FILES,
    SENTENCE_TRANSFORMERS_FILES,
    TOKENIZER_FILES,
    TOKENIZER_PATTERNS,
    check_folder,
    check_model_files,
    code_files,
    inside,
    read_json,
)
from ..model_folder import folder_kind as _folder_kind
from ..errors import PublishError, PublishUsageError


def _present(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if (folder / name).is_file()]


def _matching(folder: Path, patterns: tuple[str, ...]) -> list[str]:
    return sorted({p.name for pattern in patterns for p in folder.glob(pattern) if p.is_file()})


def _files_under(folder: Path, subdir: Path) -> list[str]:
    """Every regular file below `subdir` (inside `folder`), as posix paths relative to `folder`; refuses pickles."""
    files = sorted(p.relative_to(folder).as_posix() for p in subdir.rglob("*") if p.is_file())
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PublishError(f"{subdir} holds pickled files ({', '.join(pickles)}); pickles are never "
                           "pushed. Re-save the module with safetensors.")
    return [f for f in files if "__pycache__" not in f and not Path(f).name.startswith(".")]


def _code_files(folder: Path, auto_map, source: str) -> list[str]:
    """The `.py` files that an `auto_map` names; each must be in the folder."""
    names = code_files(folder, auto_map, source)
    missing = sorted(name for name in names if not (folder / name).is_file())
    if missing:
        raise PublishError(f"{folder}: {source} auto_map needs {', '.join(missing)}, which the folder lacks")
    return names


def _model_files(folder: Path) -> list[str]:
    """The files of a full DiffEmbed folder that a push sends, or a PublishError naming what is wrong."""
    config = read_json(folder / CONFIG, PublishError)
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
    weights = check_model_files(folder)  # JSON files that parse, whole weight headers, a tokenizer
    files = ["config.json", *_present(folder, ("generation_config.json",)), *REMOTE_CODE_FILES,
             *_code_files(folder, auto_map, "config.json"), *weights]

    tokenizer = _present(folder, TOKENIZER_FILES) + _matching(folder, TOKENIZER_PATTERNS)
    if not {"tokenizer.json", "tokenizer_config.json"} & set(tokenizer):
        raise PublishError(f"{folder} has no tokenizer (tokenizer.json / tokenizer_config.json); save it beside "
                           "the model (tokenizer.save_pretrained)")
    files += tokenizer
    if (folder / "tokenizer_config.json").is_file():
        files += _code_files(folder, read_json(folder / "tokenizer_config.json", PublishError).get("auto_map") or {},
                             "tokenizer_config.json")

    if not (folder / "modules.json").is_file():
        raise PublishError(f"{folder} has no modules.json, so sentence-transformers would build it without its "
                           "Normalize step; add the files with diffembed_hf.sentence_transformer."
                           "write_sentence_transformer_files(folder)")
    files += _present(folder, SENTENCE_TRANSFORMERS_FILES)
    for module in read_json(folder / "modules.json", PublishError):
        path = module.get("path", "")
        if not path:
            continue
        module_dir = inside(folder, path, what=f"{folder / 'modules.json'} (module {module.get('name')!r})")
        if module_dir.is_dir():
            files += _files_under(folder, module_dir)
        elif not module.get("type", "").endswith("Normalize"):  # Normalize keeps no files: git drops its folder
            raise PublishError(f"{folder}: modules.json names the module folder {path!r}, which is missing")
    return sorted(set(files + _matching(folder, LICENSE_PATTERNS)))


def _adapter_files(folder: Path) -> list[str]:
    """The files of a LoRA adapter folder that a push sends: adapter config and weights, tokenizer, licences."""
    config = read_json(folder / ADAPTER_CONFIG, PublishError)
    if not config.get("peft_type") or not config.get("base_model_name_or_path"):
        raise PublishError(f"{folder / ADAPTER_CONFIG} is not a PEFT adapter config with a base model "
                           "(peft_type and base_model_name_or_path are required)")
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise PublishError(f"{folder} has no {ADAPTER_WEIGHTS}" + (" (only adapter_model.bin, a pickle, which is "
                           "never pushed; re-save it with safetensors)" if pickled else ""))
    return sorted({ADAPTER_CONFIG, ADAPTER_WEIGHTS, *_present(folder, TOKENIZER_FILES),
                   *_matching(folder, LICENSE_PATTERNS)})


def folder_kind(folder: str | Path) -> str:
    """"model" for a full DiffEmbed folder, "adapter" for a PEFT adapter folder; PublishError otherwise."""
    if not Path(folder).is_dir():
        raise PublishUsageError(f"{folder} is not a folder")
    return _folder_kind(folder, PublishError)


def files_to_push(folder: str | Path) -> list[str]:
    """The paths (relative to `folder`) a push sends besides README.md; PublishError if the folder cannot be
    pushed, `UntrustedFolderError` if a path or link in it leads outside it."""
    folder = Path(folder)
    kind = folder_kind(folder)
    check_folder(folder)
    return _model_files(folder) if kind == "model" else _adapter_files(folder)
