"""Convert upstream checkpoints (Dream, LLaDA, Qwen2/Llama/Mistral) into Hub-ready DiffEmbed folders.

The output folder holds a DiffEmbed `config.json` (with `auto_map`), the two remote-code files, the weights
renamed to `DiffEmbedForEmbedding`'s names (language-model head dropped), the source tokenizer (with a pad
token), the sentence-transformers files and a short model card.

How it stays safe on a 7B checkpoint:
  * **bounded memory** - tensor bytes are copied from the source safetensors files to the output shards in
    16 MiB chunks; no tensor, shard or model is ever materialised, so peak memory is the imports plus one
    chunk whatever the checkpoint size (measured: +37 MiB over the imports on a 1.3 GiB checkpoint). Every
    tensor keeps its dtype: its bytes are copied, not converted. Pickle sources, when allowed, are
    memory-mapped one shard at a time.
  * **validated before writing** - every source header is read first: each expected tensor must be present
    exactly once with the shape the config implies, and no unknown tensor may remain.
  * **nothing half-written** - the folder is built in a hidden temporary folder beside OUT and renamed into
    place only when complete; an error removes it. A killed process (SIGKILL) leaves only that hidden
    `.OUT.tmp-PID-*` folder, which the next conversion to the same OUT removes.
  * **never unpickles** - only safetensors are read, unless `allow_pickle=True`, which loads `.bin` files
    with `torch.load(weights_only=True)`, one shard at a time.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, Qwen2Tokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .. import __version__, modeling, register_auto_classes
from ..model_folder import (
    CONFIG,
    LICENSE_PATTERNS,
    REMOTE_CODE_FILES,
    TOKENIZER_FILES,
    check_folder,
    check_tokenizer,
    is_hub_id,
    read_json_or_empty,
)
from ..errors import ConversionError, ConversionUsageError, UsageError, one_line
from ..outputs import check_parent_writable, output_lock, parse_size, staged_folder, write_json
from ..model_card import write_model_card
from ..records import ConversionRecord, GgufSource
from ..modeling.configuration_diffembed import DiffEmbedConfig
from ..sentence_transformer import write_sentence_transformer_files
from ..validation import MAX_SEQ_LENGTH, check_choice, check_max_seq_length, read_options, with_overrides
from .gguf import DEFAULT_GGUF_DTYPE, GGUF_DTYPES, dequantized_checkpoint, find_gguf_file
from .families import FAMILIES, Family, build_config, detect_family, sliding_window_cap
from .weights import DEFAULT_MAX_SHARD_SIZE, plan_tensors, read_source_tensors, write_weights

logger = logging.getLogger(__name__)
register_auto_classes()

# Embedders rarely see longer inputs, and attention cost grows with the square of the length.


# Remote-code tokenizer classes with a transformers equivalent: Dream's tokenization_dream.DreamTokenizer is
# Qwen2's byte-level BPE over the same vocab.json / merges.txt, so no source code has to run.
_TOKENIZER_SUBSTITUTES = {"DreamTokenizer": Qwen2Tokenizer}


def _load_tokenizer(folder: Path, source_config: dict, trust_remote_code: bool) -> Optional[PreTrainedTokenizerBase]:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files; the converted folder will have no tokenizer.", folder)
        return None
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = read_json_or_empty(config_path, ConversionError)
    auto_map = tokenizer_config.get("auto_map") or {}
    remote = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map  # a list: legacy format
    if remote and not trust_remote_code:
        substitute = _TOKENIZER_SUBSTITUTES.get(tokenizer_config.get("tokenizer_class"))
        if substitute is None:
            raise ConversionError(
                f"{config_path}: the tokenizer needs remote code ({remote}). Pass trust_remote_code=True "
                "(--trust-remote-code) to run it, after reading it."
            )
        logger.info("Loading %s as transformers' %s (same algorithm, no remote code).",
                    tokenizer_config["tokenizer_class"], substitute.__name__)
        tokenizer = substitute.from_pretrained(folder)
        tokenizer.init_kwargs.pop("auto_map", None)  # else the saved tokenizer would still ask for the remote code
        return tokenizer
    # AutoTokenizer would otherwise load config.json itself, running the source model's remote configuration
    # code (LLaDA, Dream) when trust_remote_code is given for the tokenizer. Only model_type matters to it.
    model_type = source_config.get("model_type")
    model_config = AutoConfig.for_model(model_type) if model_type in CONFIG_MAPPING else PretrainedConfig()
    try:
        return AutoTokenizer.from_pretrained(folder, config=model_config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - a damaged file surfaces as KeyError, ValueError, OSError...
        check_tokenizer(folder)  # names the file at fault, if it can
        raise ConversionError(f"{folder}: cannot load the tokenizer ({one_line(err)})") from err


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, config: DiffEmbedConfig):
    """Set a pad token (batches need one) and the diffusion mask token; keep the config's ids in agreement."""
    if tokenizer.pad_token is None:
        if config.pad_token_id is not None and config.pad_token_id < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
            logger.info("The tokenizer has no pad token; padding with its eos token %r.", tokenizer.eos_token)
        else:
            logger.warning("The tokenizer has neither a pad nor an eos token; batches cannot be padded.")
    mask_id = getattr(config, "mask_token_id", None)
    if mask_id is not None and tokenizer.mask_token is None and mask_id < len(tokenizer):
        tokenizer.mask_token = tokenizer.convert_ids_to_tokens(mask_id)
    for name in ("bos_token_id", "eos_token_id"):  # the tokenizer's ids are the ones text is encoded with
        token_id = getattr(tokenizer, name)
        if token_id is not None and getattr(config, name) != token_id:
            logger.info("config.json %s %s -> %s, the tokenizer's.", name, getattr(config, name), token_id)
            setattr(config, name, token_id)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    elif tokenizer.pad_token_id != config.pad_token_id:
        logger.warning("config.json pad_token_id %s differs from the tokenizer's pad token id %s.",
                       config.pad_token_id, tokenizer.pad_token_id)
    if tokenizer.model_max_length > config.max_position_embeddings:
        tokenizer.model_max_length = config.max_position_embeddings



# ----------------------------------------------------------------------------------------------------------
# Source resolution and the atomic output folder
# ----------------------------------------------------------------------------------------------------------


def _resolve_source(src: str | os.PathLike, revision: Optional[str], allow_pickle: bool) -> tuple[Path, Optional[str]]:
    """A local folder, or a Hub id downloaded (safetensors, config, tokenizer; never .bin unless allowed)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path} is a file; the source must be a checkpoint folder or a Hub id")
        check_folder(path)  # untrusted: no shard or link may lead the conversion outside it
        return path, None
    repo_id = str(src)
    if not is_hub_id(repo_id):
        raise ConversionUsageError(f"source folder {path} does not exist (and {repo_id!r} is not a Hub id)")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import OfflineModeIsEnabled

    patterns = ["config.json", "*.safetensors.index.json", *TOKENIZER_FILES, "*.tiktoken", "tokenization_*.py",
                *LICENSE_PATTERNS, "model*.safetensors"]
    pickles = ["pytorch_model*.bin", "pytorch_model.bin.index.json"] if allow_pickle else []
    try:
        try:  # .bin files only where the repository has no safetensors weights
            if any(name.endswith(".safetensors") for name in HfApi().list_repo_files(repo_id, revision=revision)):
                pickles = []
        except OfflineModeIsEnabled:
            pass  # HF_HUB_OFFLINE: snapshot_download serves the local cache, if it holds the repository
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns + pickles)
    except (OSError, ValueError) as err:  # offline, not found, gated, network: huggingface_hub raises OSErrors
        raise ConversionError(
            f"{repo_id!r} is not a local folder, and downloading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {err}). Check the id, the network (HF_HUB_OFFLINE), and HF_TOKEN for gated models."
        ) from err
    return Path(folder), repo_id


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ConvertOptions:
    """How `convert_checkpoint` reads its source and writes the DiffEmbed folder, checked once, here. Load them
    from JSON with `from_file`.

    Attributes:
        family: force the source family (one of `FAMILIES`) instead of reading config.json's model_type.
        overwrite: replace an existing `out`, only once the new folder is complete.
        max_shard_size: output shard cap in bytes or as "5GB" / "500MiB".
        max_seq_length: sentence-transformers' truncation length; defaults to min(source max positions, 4096).
        allow_pickle: accept `.bin` weights, loaded with `torch.load(weights_only=True)`.
        ignore_sliding_window: convert a sliding-window source (Mistral v0.1) to full attention.
        trust_remote_code: let a tokenizer with remote code run it (Dream's needs none: Qwen2's is used).
        revision: Hub revision, for a Hub id.
        gguf_file: the GGUF file inside folder `src`, where the folder holds several.
        dtype: what a GGUF source is dequantized to (float32, bfloat16 or float16; default float32).
    """

    family: Optional[str] = None
    overwrite: bool = False
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
    max_seq_length: Optional[int] = None
    allow_pickle: bool = False
    ignore_sliding_window: bool = False
    trust_remote_code: bool = False
    revision: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: Optional[str] = None

    def __post_init__(self):
        check_max_seq_length(self.max_seq_length)
        check_choice("dtype", self.dtype, tuple(GGUF_DTYPES), optional=True)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> ConvertOptions:
        """The options a JSON file of field values sets, `overrides` winning; unknown keys are an error."""
        return read_options(cls, path, "conversion", **overrides)


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions | None = None,
                       **overrides) -> Path:
    """Convert a Dream / LLaDA / Qwen2 / Llama / Mistral checkpoint into a DiffEmbed folder at `out`, as
    `options` (a `ConvertOptions`, or its fields as keywords, e.g. `max_seq_length=512`) say.

    Args:
        src: a local checkpoint folder (config.json, safetensors weights, tokenizer files), a Hub id, or a GGUF
            file (MODEL.gguf, or a folder holding one), dequantized by transformers' GGUF loading (`convert.gguf`).
        out: the folder to create. It must not exist unless `overwrite`, which replaces it only once the new
            folder is complete.
        options: see `ConvertOptions`.

    Returns the output folder. Raises `ConversionError` (naming the file, key or tensor) and leaves no `out`.
    """
    o = with_overrides(ConvertOptions, options, overrides)
    family, overwrite, max_seq_length, dtype, gguf_file = o.family, o.overwrite, o.max_seq_length, o.dtype, o.gguf_file
    out = Path(out).expanduser().absolute()
    try:
        check_parent_writable(out)
    except UsageError as err:
        raise ConversionUsageError(str(err)) from None
    try:
        shard_bytes = parse_size(o.max_shard_size)
    except UsageError as err:
        raise ConversionUsageError(str(err)) from None
    with output_lock(out):  # first: only a check made under the lock holds until the folder is published
        if out.exists() and not overwrite:
            raise ConversionUsageError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
        if out.exists() and not out.is_dir():
            raise ConversionUsageError(f"{out} exists and is not a folder")
        gguf_path = find_gguf_file(src, gguf_file)
        if gguf_path is None:
            return _convert(src, out, family=family, overwrite=overwrite, shard_bytes=shard_bytes,
                            max_seq_length=max_seq_length, allow_pickle=o.allow_pickle,
                            ignore_sliding_window=o.ignore_sliding_window, trust_remote_code=o.trust_remote_code,
                            revision=o.revision, dtype=dtype, provenance=None)
        with dequantized_checkpoint(gguf_path, out, dtype) as (checkpoint, info):
            record = {"source": str(src), "options": {"--gguf-file": gguf_file, "--dtype": dtype},
                      "gguf": info.record(dtype or DEFAULT_GGUF_DTYPE)}
            return _convert(checkpoint, out, family=family, overwrite=overwrite, shard_bytes=shard_bytes,
                            max_seq_length=max_seq_length, allow_pickle=False,
                            ignore_sliding_window=o.ignore_sliding_window, trust_remote_code=False, revision=None,
                            dtype=None, provenance=record)


def _convert(src: str | Path, out: Path, *, family: Optional[str], overwrite: bool, shard_bytes: int,
             max_seq_length: Optional[int], allow_pickle: bool, ignore_sliding_window: bool, trust_remote_code: bool,
             revision: Optional[str], dtype: Optional[str], provenance: Optional[dict]) -> Path:
    """The conversion itself, run while `convert_checkpoint` holds the output's lock (OUT already checked)."""
    if dtype is not None:
        raise UsageError(f"--dtype {dtype} applies to GGUF sources only; {src}'s weights keep their dtype")
    folder, hub_id = _resolve_source(src, revision, allow_pickle)
    if folder.resolve() == out.resolve() or out.resolve() in folder.resolve().parents:
        raise ConversionError(f"the output {out} must not contain the source {folder}")

    config_path = folder / CONFIG
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        source_config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ConversionError(f"{config_path}: not valid JSON ({err})") from err
    if family is None:
        fam = detect_family(source_config, config_path)
    elif family in FAMILIES:
        fam = FAMILIES[family]
    else:
        raise ConversionError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    logger.info("Converting %s as %s.", (provenance or {}).get("source", src), fam.title)
    window = sliding_window_cap(source_config, fam, config_path, ignore_sliding_window)

    tensors = read_source_tensors(folder, allow_pickle)
    weights_dtype = next((t.dtype for t in tensors if t.name == fam.source_name("model.embed_tokens.weight")),
                         torch.float32)
    config = build_config(source_config, fam, config_path, weights_dtype)
    plan = plan_tensors(tensors, fam, config)
    requested_length = max_seq_length
    if max_seq_length is None:
        max_seq_length = min(config.max_position_embeddings, window or math.inf, MAX_SEQ_LENGTH)
    else:
        check_max_seq_length(max_seq_length, config.max_position_embeddings)
    tokenizer = _load_tokenizer(folder, source_config, trust_remote_code)

    with staged_folder(out, replace=overwrite) as tmp:
        if tokenizer is not None:
            _prepare_tokenizer(tokenizer, config)
            tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        for name in REMOTE_CODE_FILES:
            shutil.copyfile(Path(modeling.__file__).parent / name, tmp / name)
        for pattern in LICENSE_PATTERNS:
            for path in folder.glob(pattern):
                shutil.copyfile(path, tmp / path.name)
        write_weights(tmp, plan, shard_bytes)
        write_sentence_transformer_files(tmp, max_seq_length=max_seq_length)
        provenance = provenance or {}
        options = {"--family": family, "--revision": revision, "--max-seq-length": requested_length,
                   "--ignore-sliding-window": window is not None, "--allow-pickle": tensors[0].offset is None,
                   "--trust-remote-code": trust_remote_code, **provenance.get("options", {})}  # fmt: skip
        shown_source = provenance.get("source", str(src))
        command = " ".join(["diffembed convert", shown_source, out.name] + [
            flag if value is True else f"{flag} {value}" for flag, value in options.items() if value
        ])
        record = ConversionRecord(
            source=hub_id or shown_source, hub_id=hub_id, family=fam.name, family_title=fam.title,
            diffusion=fam.diffusion, dtype=str(weights_dtype).removeprefix("torch."), command=command,
            sliding_window=window, version=__version__,
            gguf=GgufSource(**provenance["gguf"]) if "gguf" in provenance else None)
        write_json(tmp / ConversionRecord.FILE, record.to_dict())
        write_model_card(tmp, repo_id=out.name, base_model=hub_id)
    logger.info("Wrote %s", out)
    return out


__all__ = ["ConversionError", "FAMILIES", "Family", "convert_checkpoint", "detect_family"]
