"""What a DiffEmbed checkpoint folder is: its files, the records the jobs leave in it, its identity, and the
checks that make a folder safe to read.

Every job that reads or writes a model folder (convert, train, encode, evaluate, export, push, the model card)
takes these facts from here, so they cannot drift apart:

  * names: the records (`diffembed_conversion.json`, `diffembed_training.json`, the `eval/` results), the
    remote-code files, the tokenizer, sentence-transformers and licence files, adapter files;
  * `is_hub_id`: the one test of "is this a Hub repo id rather than a local path";
  * `open_model_folder` -> `ModelFolder`: a local model folder read and checked once per job (its kind, config,
    weights, tokenizer and sentence-transformers files, trust checks; its identity on first use), then handed
    down to whatever loads or records it;
  * `folder_kind`: a full model or a PEFT adapter;
  * `content_digest` / `model_identity`: what identifies the vectors a folder makes - its weights, config,
    tokenizer and sentence-transformers files, and nothing else (writing `eval/` or an output inside the
    folder, or editing its README, leaves the identity unchanged); an adapter's identity includes its base's;
  * `base_reference` / `adapter_base`: how a folder made from a base names it (an absolute path or a Hub id
    with its commit, never a path that depends on the reader's working directory), and how that name is read;
  * `inside` / `check_folder`: a folder is untrusted input. A path its metadata names (modules.json, a weight
    index, an auto_map) must stay inside it, and a symbolic link in it must not lead out of it (Hugging Face
    cache snapshots, whose files link to the repository's blobs, excepted); `check_remote_code` refuses a
    folder's own code (every Python file in it, every modules.json type outside sentence-transformers) unless
    the user opted in, for every job that loads, validates or pushes a folder.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import DiffembedError, ModelFilesError, UntrustedFolderError, UsageError

logger = logging.getLogger(__name__)

CONFIG = "config.json"
CONVERSION_RECORD = "diffembed_conversion.json"  # written by `diffembed convert`; read for the card
TRAINING_RECORD = "diffembed_training.json"  # written by `diffembed train`; read for the card
EVAL_FOLDER = "eval"  # `diffembed evaluate MODEL --output MODEL/eval`: the card of MODEL shows these results
EVAL_SUMMARY = "summary.json"
EVAL_RUN = "run.json"
WEIGHT_INDEX = "model.safetensors.index.json"
REMOTE_CODE_FILES = ("configuration_diffembed.py", "modeling_diffembed.py", "attention_kernels.py")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
TOKENIZER_PATTERNS = ("*.tiktoken", "tokenization_*.py")
SENTENCE_TRANSFORMERS_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
LICENSE_PATTERNS = ("LICENSE*", "NOTICE*", "USE_POLICY*")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DATA_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonlines", ".csv", ".tsv", ".parquet", ".txt", ".gz", ".bz2", ".xz")

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")


def is_hub_id(name: Any) -> bool:
    """"namespace/name" with the Hub's characters, and not an existing local path, a path spelled as one
    (`./x`, `~/x`) or a data file name: what can only be meant as a Hub repo id."""
    if not isinstance(name, str) or not _HUB_ID.fullmatch(name) or ".." in name or name.endswith((".", "-")):
        return False
    if Path(name).expanduser().exists() or name.lower().endswith(DATA_SUFFIXES):
        return False
    return True


def local_folder(name: str | os.PathLike) -> Path | None:
    """The folder `name` names, or None for a name that can only be a Hub id; a missing local path is an error
    that says so (never reported as an unreachable Hub repo)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UsageError(f"{name} is a file; give a model folder or a Hub id")
    if is_hub_id(str(name)):
        return None
    raise UsageError(f"{name}: no such folder (and not a Hub id of the form namespace/name)")


def read_json(path: Path, error: type[DiffembedError] = DiffembedError) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise error(f"{path} cannot be read as JSON: {err}") from None


def read_json_or_empty(path: Path, error: type[DiffembedError] = DiffembedError) -> dict:
    return read_json(path, error) if Path(path).is_file() else {}


def folder_kind(folder: str | Path, error: type[DiffembedError] = DiffembedError) -> str:
    """"model" for a full DiffEmbed folder, "adapter" for a PEFT adapter folder; `error` otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{folder} is not a folder")
    has_model, has_adapter = (folder / CONFIG).is_file(), (folder / ADAPTER_CONFIG).is_file()
    if has_model and has_adapter:
        raise error(f"{folder} holds both a model ({CONFIG}) and an adapter ({ADAPTER_CONFIG}); transformers "
                    "would load it as the adapter. Remove the one you do not mean to use.")
    if has_model:
        return "model"
    if has_adapter:
        return "adapter"
    raise error(f"{folder} is not a DiffEmbed checkpoint: it has no {CONFIG} (nor {ADAPTER_CONFIG})")


def weight_files(folder: Path) -> list[str]:
    """The safetensors weight files of a model folder (the index first, if sharded); `ModelFilesError` when they
    are missing, pickled only, or ambiguous (both a single file and an index: which one loads is not obvious)."""
    single, index = folder / "model.safetensors", folder / WEIGHT_INDEX
    if single.is_file() and index.is_file():
        raise ModelFilesError(f"{folder} holds both model.safetensors and {WEIGHT_INDEX}; remove the stale one so "
                              "that the folder loads the weights you mean")
    if single.is_file():
        return [single.name]
    if index.is_file():
        weight_map = read_json(index, ModelFilesError).get("weight_map") or {}
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        for shard in shards:
            inside(folder, shard, what=str(index))
        missing = [s for s in shards if not (folder / s).is_file()]
        if not shards or missing:
            raise ModelFilesError(f"{index} names shards that are missing: {', '.join(missing) or '(none listed)'}")
        return [index.name, *shards]
    if any(folder.glob("pytorch_model*.bin")):
        raise ModelFilesError(f"{folder} has only pickled weights (pytorch_model*.bin); re-save them with "
                              "save_pretrained() (safetensors)")
    raise ModelFilesError(f"{folder} has no weights (model.safetensors or {WEIGHT_INDEX})")


# The tokenizer files that hold a vocabulary (tokenizer_config.json and special_tokens_map.json only configure one).
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "merges.txt")


def check_model_files(folder: Path, *, deep: bool = False) -> list[str]:
    """Refuse a full model folder whose files cannot load, naming the file: every JSON file the loaders read must
    parse, every safetensors weight file must have a whole header (offsets covering the file), and there must be
    a tokenizer. These checks read no weights and take milliseconds; run before a model loads, they replace
    what transformers would report only after loading every weight ("Unrecognized processing class", a
    SafetensorError naming no file).

    `deep=True` also reads tokenizer.json with the tokenizers library (a fraction of a second for a large
    vocabulary): after a load failed, to name the file at fault, and before a job that copies the tokenizer
    without loading it (export). Raises `ModelFilesError` with exit status 1: the folder is damaged, the job
    cannot run. Returns the weight files (`weight_files`)."""
    folder = Path(folder)

    def refuse(message: str):
        raise ModelFilesError(message, exit_status=1)

    def parse(name: str) -> Any:
        try:
            return json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            refuse(f"{folder / name} cannot be read as JSON ({err}); the folder is damaged: copy that file again "
                   "from where the model came from")

    json_files = [CONFIG, "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                  "added_tokens.json", *SENTENCE_TRANSFORMERS_FILES]
    found = {name: parse(name) for name in json_files if (folder / name).is_file()}
    for module in found.get("modules.json") if isinstance(found.get("modules.json"), list) else []:
        path = module.get("path") if isinstance(module, dict) else None
        if isinstance(path, str) and path and (folder / path / CONFIG).is_file():
            parse(f"{path}/{CONFIG}")  # a module's settings (1_Pooling/config.json)
    weights = weight_files(folder)
    for name in weights:
        if name.endswith(".safetensors"):
            _check_safetensors_header(folder / name, refuse)
    if not any(True for pattern in (*TOKENIZER_FILES, *TOKENIZER_PATTERNS) for _ in folder.glob(pattern)):
        refuse(f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...); save the tokenizer "
               "beside the model (tokenizer.save_pretrained), from the model it was converted or trained from")
    if deep:
        check_tokenizer(folder)
    return weights


def check_tokenizer(folder: Path) -> None:
    """Name the tokenizer file that keeps a tokenizer from loading: a vocabulary is there (or the tokenizer's own
    code builds one), tokenizer_config.json parses, and tokenizer.json is one the tokenizers library reads (a
    fraction of a second for a large vocabulary). transformers reports all of these as "Unrecognized processing
    class" or a bare KeyError. Raises `ModelFilesError` with exit status 1."""
    folder = Path(folder)
    tokenizer_config = read_json_or_empty(folder / "tokenizer_config.json", ModelFilesError)
    vocabulary = any(True for pattern in (*VOCABULARY_FILES, "*.tiktoken") for _ in folder.glob(pattern))
    if not vocabulary and not (isinstance(tokenizer_config, dict) and tokenizer_config.get("auto_map")):
        raise ModelFilesError(f"{folder} has tokenizer settings but no vocabulary ({', '.join(VOCABULARY_FILES)}); "
                              "save the whole tokenizer beside the model (tokenizer.save_pretrained)", exit_status=1)
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as err:  # noqa: BLE001 - the Rust library raises a plain Exception for any bad file
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ModelFilesError(f"{folder / 'tokenizer.json'} is not a tokenizer the tokenizers library can read "
                                  f"({reason}); copy it again from where the model came from", exit_status=1) from None


def _check_safetensors_header(path: Path, refuse) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass  # opening checks the header: JSON, dtypes, offsets covering the file exactly
    except (SafetensorError, OSError) as err:
        refuse(f"{path} is not a readable safetensors file ({err}); the weights are damaged or cut short: copy them "
               "again from where the model came from")


# ----------------------------------------------------------------------------------------------------------
# A folder is untrusted input
# ----------------------------------------------------------------------------------------------------------


def _cache_blobs(folder: Path) -> Path | None:
    """`<repo>/blobs` when `folder` is a Hugging Face cache snapshot (`<repo>/snapshots/<commit>`)."""
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return (folder.parent.parent / "blobs").resolve()
    return None


def inside(folder: Path, relative: str, *, what: str) -> Path:
    """`folder / relative` for a path that the folder's own metadata names (`what` says where, for the message):
    refused unless it is relative, has no `..`, and (links followed) stays inside the folder."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise UntrustedFolderError(f"{what} names the path {relative!r}, which is not a relative path")
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if relative.startswith(("/", "\\")) or PurePosixPath(relative).is_absolute() or ".." in parts or (
            parts and re.match(r"^[A-Za-z]:", parts[0])):
        raise UntrustedFolderError(f"{what} names {relative!r}, a path outside {folder}; refused")
    path = folder / relative
    _check_contained(folder, path, what)
    return path


def _check_contained(folder: Path, path: Path, what: str) -> None:
    root = folder.resolve()
    target = path.resolve()
    if target == root or root in target.parents:
        return
    blobs = _cache_blobs(root)
    if blobs is not None and blobs in target.parents:
        return
    raise UntrustedFolderError(f"{what}: {path.relative_to(folder) if path.is_relative_to(folder) else path} "
                               f"leads outside {folder} (to {target}); refused")


def check_folder(folder: Path) -> None:
    """Refuse a folder holding a symbolic link that leads outside it, naming the link; also check every path
    that modules.json and the weight index name. Run before a job reads anything the folder points to."""
    folder = Path(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            path = base / name
            if path.is_symlink():
                _check_contained(folder, path, f"the symbolic link {path}")
        dirnames[:] = [d for d in dirnames if not (base / d).is_symlink()]  # checked above; never walked twice
    modules = folder / "modules.json"
    if modules.is_file():
        entries = read_json(modules, UntrustedFolderError)
        if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
            raise UntrustedFolderError(f"{modules}: expected a list of module entries")
        for module in entries:
            if module.get("path"):
                inside(folder, module["path"], what=f"{modules} (module {module.get('name')!r})")
    index = folder / WEIGHT_INDEX
    if index.is_file():
        weight_map = read_json(index, UntrustedFolderError).get("weight_map") or {}
        for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else []):
            inside(folder, shard, what=f"{index}")


def code_files(folder: Path, auto_map: Any, source: str) -> list[str]:
    """The `.py` files of `folder` that an `auto_map` ("module.Class", or a list of them for tokenizers) names;
    a reference to another repository ("repo--module.Class") names none here."""
    entries = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    names = set()
    for entry in entries:
        for ref in entry if isinstance(entry, list) else [entry]:
            if isinstance(ref, str) and "--" not in ref and "." in ref:
                names.add(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    for name in names:
        inside(folder, name, what=f"{folder / source} auto_map")
    return sorted(names)


SENTENCE_TRANSFORMERS_MODULES = "sentence_transformers."  # the module types sentence-transformers itself provides


def foreign_code(folder: Path, *, in_process: bool = False) -> list[str]:
    """What of `folder` is its own code, which a load with remote code allowed may run: every Python file in it
    (any name, any subfolder: transformers and sentence-transformers import files that no auto_map names, such
    as a modules.json type `tokenization_x.Class`) that is not byte-identical to this package's own remote code,
    and every modules.json type outside sentence-transformers' own modules. `in_process=True` leaves out
    the `REMOTE_CODE_FILES` at the top: in this process DiffEmbed's classes are this package's (registered), so
    the folder's copy never runs. Also refuses an auto_map naming a path
    outside the folder."""
    from . import modeling

    folder = Path(folder)
    ours = {name: (Path(modeling.__file__).parent / name).read_bytes() for name in REMOTE_CODE_FILES}
    for source in (CONFIG, "tokenizer_config.json"):
        if (folder / source).is_file():
            settings = read_json(folder / source, ModelFilesError)
            code_files(folder, settings.get("auto_map") or {} if isinstance(settings, dict) else {}, source)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are not followed (check_folder)
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.endswith(".py") or not path.is_file():
                continue
            relative = path.relative_to(folder).as_posix()
            if relative in ours and (in_process or ours[relative] == path.read_bytes()):
                continue
            found.append(relative)
    modules = folder / "modules.json"
    entries = read_json(modules, ModelFilesError) if modules.is_file() else []
    for module in entries if isinstance(entries, list) else []:
        kind = module.get("type") if isinstance(module, dict) else module
        if not (isinstance(kind, str) and kind.startswith(SENTENCE_TRANSFORMERS_MODULES)):
            found.append(f"the modules.json type {kind!r}")
    return found


def check_remote_code(folder: Path, trust_remote_code: bool, *, action: str = "loading it",
                      in_process: bool = False) -> None:
    """Refuse a folder holding code of its own (`foreign_code`) unless the user opted in (--trust-remote-code).
    Every job that loads a folder, pushes it or validates it asks here, so that what counts as a folder's code
    is decided once. DiffEmbed's own remote-code files, identical to this package's, need no opt-in."""
    if trust_remote_code:
        return
    foreign = foreign_code(Path(folder), in_process=in_process)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UntrustedFolderError(
            f"{folder} holds its own Python code ({shown}) that {action} would run; read it, then pass "
            "--trust-remote-code (trust_remote_code=True) to allow it")


def check_weights_match(folder: Path, config: Any) -> list[Path]:
    """The weight files (and index) of a DiffEmbed folder, after checking from their headers alone that they hold
    exactly the tensors `config` (a `DiffEmbedConfig`) implies, with its shapes. transformers would initialise a
    missing tensor at random and carry on (a "LOAD REPORT" on stderr), so a damaged file would embed, wrongly,
    without an error. Raises `ModelFilesError` with exit status 1 (the folder is damaged)."""
    import torch
    from safetensors import SafetensorError, safe_open

    from .modeling.modeling_diffembed import DiffEmbedForEmbedding

    names = weight_files(folder)
    found: dict[str, tuple[int, ...]] = {}
    stored_in: dict[str, str] = {}
    for name in (n for n in names if n.endswith(".safetensors")):
        try:
            with safe_open(str(folder / name), framework="numpy") as handle:
                for tensor in handle.keys():
                    if tensor in stored_in:
                        raise ModelFilesError(f"tensor {tensor} is stored twice: in {stored_in[tensor]} and {name}",
                                              exit_status=1)
                    stored_in[tensor] = name
                    found[tensor] = tuple(handle.get_slice(tensor).get_shape())
        except (SafetensorError, OSError) as err:
            raise ModelFilesError(f"{folder / name} is not a readable safetensors file: {err}", exit_status=1) from err
    if WEIGHT_INDEX in names:
        weight_map = read_json(folder / WEIGHT_INDEX, ModelFilesError).get("weight_map") or {}
        for tensor, shard in weight_map.items():
            if stored_in.get(tensor) != shard:
                raise ModelFilesError(f"the index names tensor {tensor} in {shard}, but {folder / shard} does not "
                                      "contain it", exit_status=1)
    with torch.device("meta"):
        expected = {name: tuple(p.shape) for name, p in DiffEmbedForEmbedding(config).state_dict().items()}
    if found.keys() != expected.keys():
        extra, missing = sorted(found.keys() - expected.keys()), sorted(expected.keys() - found.keys())
        shown = sorted(set(stored_in.values()))
        raise ModelFilesError(f"{folder}: the weights ({', '.join(shown[:3])}{', ...' if len(shown) > 3 else ''}) do "
                              f"not match config.json (unexpected: {extra[:3]}, missing: {missing[:3]}); they are "
                              "damaged or belong to another model", exit_status=1)
    for name, shape in expected.items():
        if found[name] != shape:
            raise ModelFilesError(f"{folder}: tensor {name} has shape {list(found[name])}, config.json implies "
                                  f"{list(shape)}", exit_status=1)
    files = [folder / name for name in sorted(set(stored_in.values()))]
    return files + [folder / WEIGHT_INDEX] if WEIGHT_INDEX in names else files


# ----------------------------------------------------------------------------------------------------------
# A model folder, opened once per job
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFolder:
    """A local model folder as a job reads it, checked once by `open_model_folder` and handed down (to
    `encoding.load_encoder`, the training and evaluation records, ...) instead of being read again.

    `kind` is "model" (a DiffEmbed folder) or "adapter" (a PEFT LoRA adapter, which embeds on top of `base`).
    `config` is config.json (adapter_config.json for an adapter); `weights` the weight files (the index first);
    `tokenizer_files` the tokenizer's files; `sentence_transformers` and `sentence_bert` the parsed
    config_sentence_transformers.json and sentence_bert_config.json ({} when absent). `identity` (a content
    digest: seconds for a large model) is computed on first use only."""

    path: Path
    kind: str
    config: dict
    weights: tuple[str, ...] = ()
    tokenizer_files: tuple[str, ...] = ()
    sentence_transformers: dict = field(default_factory=dict)
    sentence_bert: dict = field(default_factory=dict)
    base: tuple[str, str | None] | None = None  # an adapter's base: path or Hub id, and its revision

    def __str__(self) -> str:
        return str(self.path)

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.sentence_transformers.get("prompts") or {})

    @property
    def max_position_embeddings(self) -> int | None:
        return self.config.get("max_position_embeddings") if self.kind == "model" else None

    @cached_property
    def identity(self) -> ModelIdentity:
        """What the folder embeds with (`model_identity`): its resolved path and content digest."""
        return ModelIdentity(str(self.path.resolve()), None, content_digest(self.path))


def open_model_folder(path: str | os.PathLike, *, trust_remote_code: bool = False) -> ModelFolder:
    """Read and check a local model folder once, for a job that loads it. A DiffEmbed model folder must be
    contained (no path or link leading out of it), a DiffEmbed model (another architecture is refused, even with
    its own code), run no foreign code without `trust_remote_code`, and have files that load (every JSON file
    parses, whole safetensors headers holding exactly the tensors config.json implies, a tokenizer). An adapter
    folder names its base, which the loader opens in turn. Raises `UsageError` for a folder that is not a model,
    `UntrustedFolderError` and `ModelFilesError` (naming the file) for one that must not or cannot load."""
    folder = Path(path).expanduser()
    if folder_kind(folder, UsageError) == "adapter":
        return ModelFolder(folder, "adapter", read_json(folder / ADAPTER_CONFIG, UsageError),
                           sentence_transformers=_settings(folder / "config_sentence_transformers.json", UsageError),
                           base=adapter_base(folder, warn=True))
    check_folder(folder)
    config = read_json(folder / CONFIG, ModelFilesError)  # damaged: exit status 1, as for any damaged file
    if not isinstance(config, dict) or config.get("model_type") != "diffembed":
        model_type = config.get("model_type") if isinstance(config, dict) else None
        own = " and its own code (auto_map)" if isinstance(config, dict) and config.get("auto_map") else ""
        raise UsageError(f"{folder / CONFIG} has model_type {model_type!r}{own}: not a DiffEmbed folder; convert "
                         "it first (diffembed convert)")
    check_remote_code(folder, trust_remote_code, in_process=True)
    weights = check_model_files(folder)
    from .modeling.configuration_diffembed import DiffEmbedConfig

    try:
        diffembed_config = DiffEmbedConfig.from_dict(config)
    except (TypeError, ValueError) as err:
        raise ModelFilesError(f"{folder / CONFIG}: {err}") from None
    check_weights_match(folder, diffembed_config)
    tokenizer = sorted({p.name for pattern in (*TOKENIZER_FILES, *TOKENIZER_PATTERNS) for p in folder.glob(pattern)})
    return ModelFolder(folder, "model", config, tuple(weights), tuple(tokenizer),
                       _settings(folder / "config_sentence_transformers.json", ModelFilesError),
                       _settings(folder / "sentence_bert_config.json", ModelFilesError))


def _settings(path: Path, error: type[DiffembedError]) -> dict:
    """A settings file's object; {} when it is absent, `error` when it is not a JSON object."""
    settings = read_json_or_empty(path, error)
    if not isinstance(settings, dict):
        raise error(f"{path}: expected a JSON object")
    return settings


def as_model_folder(model: str | os.PathLike | ModelFolder, *,
                    trust_remote_code: bool = False) -> ModelFolder | None:
    """`model` opened once: a `ModelFolder` as it is, a local path opened (`open_model_folder`), None for a
    name that can only be a Hub id (checked where it loads, once downloaded)."""
    if isinstance(model, ModelFolder):
        return model
    folder = local_folder(model)
    return None if folder is None else open_model_folder(folder, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------------------------------------
# Identity: what decides the vectors a folder makes
# ----------------------------------------------------------------------------------------------------------


def identity_files(folder: Path) -> list[str]:
    """The files whose content decides what `folder` embeds: config, weights (and index), tokenizer,
    sentence-transformers files and their module folders, remote code, adapter. Records, the card, `eval/`,
    hidden files and any other subfolder (an output written inside the model folder) are not among them."""
    folder = Path(folder)
    patterns = (CONFIG, WEIGHT_INDEX, "*.safetensors", "pytorch_model*.bin", *TOKENIZER_FILES, *TOKENIZER_PATTERNS,
                *SENTENCE_TRANSFORMERS_FILES, *REMOTE_CODE_FILES, ADAPTER_CONFIG, "adapter_model.*")
    names = {p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and any(fnmatch.fnmatch(p.name, pattern) for pattern in patterns)}
    for source in (CONFIG, "tokenizer_config.json"):
        if (folder / source).is_file():
            names.update(n for n in code_files(folder, read_json(folder / source).get("auto_map") or {}, source)
                         if (folder / n).is_file())
    modules = folder / "modules.json"
    for module in read_json(modules) if modules.is_file() else []:
        path = module.get("path") if isinstance(module, dict) else None
        if path and (folder / path).is_dir():
            module_dir = inside(folder, path, what=f"{modules}")
            names.update(p.relative_to(folder).as_posix() for p in module_dir.rglob("*")
                         if p.is_file() and not p.name.startswith("."))
    return sorted(names)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(folder: Path, _adapters: tuple[Path, ...] = ()) -> str:
    """sha256 over the names and contents of `identity_files(folder)` (about 10 s for 15 GB of weights). An
    adapter folder embeds with its base, so the base's identity is part of its own: the same adapter files on
    another base (another folder, or another commit of a Hub id) are another model."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in identity_files(folder):
        digest.update(name.encode("utf-8") + b"\x00" + file_sha256(folder / name).encode() + b"\x00")
    if (folder / ADAPTER_CONFIG).is_file() and not (folder / CONFIG).is_file():
        digest.update(b"base\x00" + _base_digest(folder, _adapters).encode("utf-8") + b"\x00")
    return digest.hexdigest()


def _base_digest(adapter: Path, seen: tuple[Path, ...]) -> str:
    """The identity of the base an adapter loads: a local folder's content digest, else the Hub id and commit."""
    base, revision = adapter_base(adapter, ModelFilesError)
    path = Path(base)
    if path.is_dir():
        here = adapter.resolve()
        if path.resolve() in (*seen, here):
            raise ModelFilesError(f"{adapter / ADAPTER_CONFIG} names {base} as its base, which leads back to the "
                                  "adapter itself")
        return content_digest(path, (*seen, here))
    identity = model_identity(base, revision)
    return f"{identity.model}@{identity.revision}"


def base_reference(name_or_path: str | os.PathLike, revision: str | None = None) -> tuple[str, str | None]:
    """How a folder made from a base (an adapter, a training record) names it: a local folder by its absolute
    path, since a relative one names whatever folder of that name the reader's working directory holds; a Hub
    id with the commit it was loaded at (`revision`), since the id alone names whatever it holds later."""
    folder = local_folder(name_or_path)
    if folder is not None:
        return str(folder.resolve()), None
    return str(name_or_path), revision


def adapter_base(folder: Path, error: type[DiffembedError] = UsageError, *,
                 warn: bool = False) -> tuple[str, str | None]:
    """The base an adapter folder loads (adapter_config.json's base_model_name_or_path, and its revision), as the
    loaders resolve it: a relative path against the working directory (what transformers and PEFT do), made
    absolute here. Adapters written before `base_reference` stored such paths; `warn` says which folder that is."""
    config = read_json(Path(folder) / ADAPTER_CONFIG, error)
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base:
        raise error(f"{Path(folder) / ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    revision = config.get("revision")
    revision = revision if isinstance(revision, str) and revision else None
    path = Path(base).expanduser()
    if path.is_dir():
        if warn and not path.is_absolute():
            logger.warning("%s names its base by the relative path %r, which depends on the working directory: "
                           "using %s. Write that absolute path into its %s to make the adapter mean one model.",
                           folder, base, path.resolve(), ADAPTER_CONFIG)
        return str(path.resolve()), revision
    return base, revision


@dataclass(frozen=True)
class ModelIdentity:
    """Who made a result: a local folder (its resolved path and content digest) or a Hub repo and commit."""

    model: str
    revision: str | None = None  # Hub commit
    sha256: str | None = None  # local folder content

    @property
    def key(self) -> str:
        """Short and stable: what result records compare (a folder moved elsewhere keeps its key)."""
        return self.sha256[:20] if self.sha256 else f"{self.model}@{self.revision}"

    def as_dict(self) -> dict:
        return {"model": self.model, "revision": self.revision, "model_sha256": self.sha256}


def model_identity(name_or_path: str | os.PathLike, revision: str | None = None) -> ModelIdentity:
    """The identity of a local folder (content digest) or of a Hub id (the commit of its cached snapshot, which
    loading it has just put there; `revision` when that is not available)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return ModelIdentity(str(path.resolve()), None, content_digest(path))
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(str(name_or_path), revision=revision, local_files_only=True))
        revision = snapshot.name  # snapshots/<commit>
    except Exception:  # noqa: BLE001 - not cached: the caller's revision (or none) is all that is known
        pass
    return ModelIdentity(str(name_or_path), revision, None)


def settings_digest(values: dict) -> str:
    """A digest of JSON-able settings (sorted keys): equal settings, equal digest."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()
