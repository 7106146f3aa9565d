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
import re
import secrets
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2Tokenizer,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from . import __version__
from .modeling import configuration_diffembed, modeling_diffembed
from .modeling.configuration_diffembed import DiffEmbedConfig
from .modeling.modeling_diffembed import DiffEmbedForEmbedding
from .sentence_transformer import write_sentence_transformer_files

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
# Embedders rarely see longer inputs, and attention cost grows with the square of the length.
DEFAULT_MAX_SEQ_LENGTH = 4096
AUTO_MAP = {
    "AutoConfig": "configuration_diffembed.DiffEmbedConfig",
    "AutoModel": "modeling_diffembed.DiffEmbedForEmbedding",
}
_CHUNK_BYTES = 16 * 2**20
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
)  # fmt: skip
_LICENSE_PATTERNS = ("LICENSE*", "NOTICE*", "USE_POLICY*")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
# safetensors' dtype codes. Bytes are copied verbatim, so every dtype the format knows passes through.
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, key or tensor at fault."""


# ----------------------------------------------------------------------------------------------------------
# Families: config mapping (source config.json -> DiffEmbedConfig kwargs) and tensor names
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """How one upstream layout maps onto DiffEmbed.

    `config` turns the source config.json dict into DiffEmbedConfig kwargs; `source_name` gives, for each
    DiffEmbed tensor name, the name the source checkpoint stores it under; `dropped` matches source tensors
    an embedder does not need (language-model head, cached RoPE buffers).
    """

    name: str
    title: str
    diffusion: bool
    config: Callable[[dict, Path], dict]
    source_name: Callable[[str], str]
    dropped: re.Pattern


def _transformers_config(config_class, source: dict, path: Path):
    """Fill the source dict's defaults the way transformers itself would for that family."""
    kwargs = {k: v for k, v in source.items() if k not in ("model_type", "architectures", "auto_map")}
    try:
        return config_class(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{path}: not a valid {config_class.__name__} ({err})") from err


def _hf_backbone(tc, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool) -> dict:
    """DiffEmbedConfig kwargs from a transformers Qwen2/Llama/Mistral config object (names are shared)."""
    return dict(
        vocab_size=tc.vocab_size,
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads,
        head_dim=getattr(tc, "head_dim", None),
        hidden_act=tc.hidden_act,
        max_position_embeddings=tc.max_position_embeddings,
        rms_norm_eps=tc.rms_norm_eps,
        rope_parameters=dict(tc.rope_parameters or {}),
        attention_bias=qkv_bias,
        attention_output_bias=o_bias,
        mlp_bias=mlp_bias,
        initializer_range=tc.initializer_range,
    )


def _qwen2_config(source: dict, path: Path) -> dict:
    # Qwen2 (and Dream, which is Qwen2.5 run non-causally) always has q/k/v biases and no o_proj bias.
    kwargs = _hf_backbone(_transformers_config(Qwen2Config, source, path), qkv_bias=True, o_bias=False, mlp_bias=False)
    if "mask_token_id" in source:  # Dream's <|mask|>
        kwargs["mask_token_id"] = source["mask_token_id"]
    return kwargs


def _llama_config(source: dict, path: Path) -> dict:
    # Llama's attention_bias puts a bias on all four projections, o_proj included.
    tc = _transformers_config(LlamaConfig, source, path)
    return _hf_backbone(tc, qkv_bias=tc.attention_bias, o_bias=tc.attention_bias, mlp_bias=tc.mlp_bias)


def _mistral_config(source: dict, path: Path) -> dict:
    tc = _transformers_config(MistralConfig, source, path)
    return _hf_backbone(tc, qkv_bias=False, o_bias=False, mlp_bias=False)


# LLaDA keys and their upstream defaults (the OLMo-style ModelConfig of configuration_llada.py): a missing
# key means the upstream default, so a config that relies on an unsupported default is refused too.
_LLADA_REQUIREMENTS = (
    ("block_type", "sequential", lambda v: v == "llama", "a 'llama' block (separate q/k/v/up projections)"),
    ("layer_norm_type", "default", lambda v: v == "rms", "RMSNorm (layer_norm_type 'rms')"),
    ("layer_norm_with_affine", True, bool, "norm weights (layer_norm_with_affine true)"),
    ("bias_for_layer_norm", None, lambda v: not v, "norms without bias"),
    ("include_bias", False, lambda v: not v, "no bias on the output and MLP projections (include_bias false)"),
    ("rope", False, bool, "rotary positions (rope true)"),
    ("alibi", False, lambda v: not v, "no ALiBi"),
    ("attention_layer_norm", False, lambda v: not v, "no q/k norm (attention_layer_norm false)"),
    ("input_emb_norm", False, lambda v: not v, "no embedding norm (input_emb_norm false)"),
    ("block_group_size", 1, lambda v: v == 1, "ungrouped blocks (block_group_size 1)"),
    ("activation_type", "swiglu", lambda v: v in ("silu", "gelu", "relu"), "a gate activation silu, gelu or relu"),
)


def _llada_config(source: dict, path: Path) -> dict:
    experts = [key for key in source if "expert" in key and source[key]]
    if experts:
        raise ConversionError(f"{path}: mixture-of-experts LLaDA ({', '.join(experts)}) is not supported; "
                              "DiffEmbed runs a dense MLP.")
    for key, default, ok, meaning in _LLADA_REQUIREMENTS:
        value = source.get(key, default)
        if not ok(value):
            raise ConversionError(f"{path}: {key}={value!r} is not supported; DiffEmbed needs {meaning}.")
    heads = source.get("n_heads", 12)
    kv_heads = source.get("n_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if source.get("multi_query_attention") else heads
    d_model = _require(source, "d_model", path)
    return dict(
        vocab_size=source.get("embedding_size") or _require(source, "vocab_size", path),
        hidden_size=d_model,
        intermediate_size=source.get("mlp_hidden_size") or source.get("mlp_ratio", 4) * d_model,
        num_hidden_layers=_require(source, "n_layers", path),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act=source["activation_type"],
        max_position_embeddings=source.get("max_sequence_length", 1024),
        rms_norm_eps=source.get("rms_norm_eps", 1e-5),
        rope_theta=source.get("rope_theta", 10000.0),
        attention_bias=bool(source.get("include_qkv_bias")),
        attention_output_bias=False,
        mlp_bias=False,
        initializer_range=source.get("init_std", 0.02),
        # LLaDA rotates q/k in float32 whatever the model dtype (rope_full_precision, default true upstream).
        rope_fp32=bool(source.get("rope_full_precision", True)),
        mask_token_id=source.get("mask_token_id"),
    )


def _require(source: dict, key: str, path: Path):
    if source.get(key) is None:
        raise ConversionError(f"{path}: missing required key {key!r}")
    return source[key]


def _same_name(name: str) -> str:
    return name


# DiffEmbed name (under `model.layers.N.`) -> LLaDA name (under `model.transformer.blocks.N.`).
_LLADA_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.q_proj.bias": "q_proj.bias",
    "self_attn.k_proj.bias": "k_proj.bias",
    "self_attn.v_proj.bias": "v_proj.bias",
    "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",  # ff_proj goes through the activation: it is the gate
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}
_LLADA_TOP_NAMES = {
    "model.embed_tokens.weight": "model.transformer.wte.weight",
    "model.norm.weight": "model.transformer.ln_f.weight",
}


def _llada_name(name: str) -> str:
    if name in _LLADA_TOP_NAMES:
        return _LLADA_TOP_NAMES[name]
    layer, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
    return f"model.transformer.blocks.{layer}.{_LLADA_LAYER_NAMES[rest]}"


_HF_DROPPED = re.compile(r"lm_head\.weight|.*\.rotary_emb\.inv_freq")
FAMILIES: dict[str, Family] = {
    "dream": Family("dream", "Dream (diffusion LM, Qwen2.5 layout)", True, _qwen2_config, _same_name, _HF_DROPPED),
    "llada": Family("llada", "LLaDA (diffusion LM, OLMo layout)", True, _llada_config, _llada_name,
                    re.compile(r"model\.transformer\.ff_out\.weight")),
    "qwen2": Family("qwen2", "Qwen2 / Qwen2.5 (autoregressive LLM)", False, _qwen2_config, _same_name, _HF_DROPPED),
    "llama": Family("llama", "Llama (autoregressive LLM)", False, _llama_config, _same_name, _HF_DROPPED),
    "mistral": Family("mistral", "Mistral (autoregressive LLM)", False, _mistral_config, _same_name, _HF_DROPPED),
}
_MODEL_TYPES = {
    "Dream": "dream", "dream": "dream", "llada": "llada", "qwen2": "qwen2", "llama": "llama", "mistral": "mistral",
}  # fmt: skip


def detect_family(source_config: dict, path: Path) -> Family:
    """The family named by config.json's `model_type`."""
    model_type = source_config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ConversionError(
            f"{path}: model_type {model_type!r} is not a supported source "
            f"(supported: {', '.join(sorted(_MODEL_TYPES))}). If the checkpoint has one of these layouts "
            f"under another name, force it with family= (--family {{{','.join(FAMILIES)}}})."
        )
    return FAMILIES[_MODEL_TYPES[model_type]]


def _sliding_window_cap(source: dict, family: Family, path: Path, ignore: bool) -> Optional[int]:
    """Refuse a source trained with a sliding window unless `ignore`; returns the window when ignored.

    DiffEmbed attends over the full text. Within `sliding_window` tokens the window changes nothing, so an
    ignored window caps the default max_seq_length at that size, where full attention equals the source's.
    """
    window = source.get("sliding_window")
    if family.name == "mistral":
        active = window is not None and window < source.get("max_position_embeddings", 131072)
    elif family.name in ("qwen2", "dream"):
        active = bool(source.get("use_sliding_window")) or "sliding_attention" in (source.get("layer_types") or ())
    else:
        active = False
    if not active:
        return None
    if not ignore:
        raise ConversionError(
            f"{path}: the source uses sliding-window attention (sliding_window={window}); DiffEmbed attends over "
            "the whole text, which differs from the source beyond the window. Pass ignore_sliding_window=True "
            "(--ignore-sliding-window) to convert anyway; the default max_seq_length is then capped at the window."
        )
    logger.warning("Ignoring the source's sliding window (%s): attention beyond it differs from the source.", window)
    return window


def _build_config(source: dict, family: Family, path: Path, dtype: torch.dtype) -> DiffEmbedConfig:
    if source.get("quantization_config"):
        method = source["quantization_config"].get("quant_method", "?")
        raise ConversionError(
            f"{path}: quantized checkpoint (quant_method={method!r}); convert the unquantized weights."
        )
    kwargs = family.config(source, path)
    if kwargs.get("mask_token_id") is None:  # only diffusion LMs have one
        kwargs.pop("mask_token_id", None)
    # Passed explicitly, so DiffEmbedConfig's Dream defaults never stand in for a missing id.
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        kwargs[key] = source.get(key)
    try:
        config = DiffEmbedConfig(**kwargs, tie_word_embeddings=False)  # an embedder has no output head to tie
    except (NotImplementedError, ValueError) as err:
        raise ConversionError(f"{path}: {err}") from err
    config.architectures = [DiffEmbedForEmbedding.__name__]
    config.auto_map = dict(AUTO_MAP)
    config.dtype = dtype
    return config


# ----------------------------------------------------------------------------------------------------------
# Source weights: headers first (validated), bytes later (streamed)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceTensor:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    offset: Optional[int]  # absolute byte offset in a safetensors file; None for a pickle file


def _safetensors_header(path: Path) -> list[SourceTensor]:
    """The tensors of one safetensors file, from its header only (the library validates it first)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass  # opening checks the header: JSON, dtypes, offsets covering the file exactly
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (SafetensorError, OSError, ValueError, struct.error) as err:
        raise ConversionError(f"{path} is not a readable safetensors file: {err}") from err
    header.pop("__metadata__", None)
    tensors = []
    for name, entry in header.items():
        if entry["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {name} has dtype {entry['dtype']}, unknown to this converter")
        begin, end = entry["data_offsets"]
        dtype, shape = _ST_DTYPES[entry["dtype"]], tuple(entry["shape"])
        tensors.append(SourceTensor(name, path, dtype, shape, end - begin, 8 + length + begin))
    return sorted(tensors, key=lambda t: t.offset)  # file order: sequential reads


def _pickle_tensors(path: Path) -> list[SourceTensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a bad or non-weights file
        raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: expected a state dict of tensors")
    return [
        SourceTensor(name, path, t.dtype, tuple(t.shape), t.numel() * t.element_size(), None)
        for name, t in state.items()
    ]


def _indexed_files(folder: Path, index_name: str) -> tuple[list[Path], dict[str, str]]:
    """Shard files named by an index (each checked to exist) and its weight map."""
    index_path = folder / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as err:
        raise ConversionError(f"{index_path}: not a readable index with a weight_map ({err})") from err
    files = list(dict.fromkeys(weight_map.values()))
    for name in files:
        if not (folder / name).is_file():
            raise ConversionError(f"{index_path} names shard {name}, which is missing from {folder}")
    return [folder / name for name in files], weight_map


def read_source_tensors(folder: Path, allow_pickle: bool) -> list[SourceTensor]:
    """Every tensor of the checkpoint in `folder`, from headers only, in file order."""
    if (folder / "model.safetensors.index.json").is_file():
        files, weight_map = _indexed_files(folder, "model.safetensors.index.json")
        read = _safetensors_header
    elif (folder / "model.safetensors").is_file():
        files, weight_map, read = [folder / "model.safetensors"], None, _safetensors_header
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
        if not pickles:
            raise ConversionError(f"{folder}: no weights found (model.safetensors or model.safetensors.index.json).")
        if not allow_pickle:
            raise ConversionError(
                f"{folder} has only pickle weights ({', '.join(pickles)}), and loading pickle files can run "
                "arbitrary code. Convert them to safetensors first, or pass allow_pickle=True (--allow-pickle) "
                "to load them with torch.load(weights_only=True)."
            )
        if (folder / "pytorch_model.bin.index.json").is_file():
            files, weight_map = _indexed_files(folder, "pytorch_model.bin.index.json")
        elif len(pickles) == 1:
            files, weight_map = [folder / pickles[0]], None
        else:
            raise ConversionError(
                f"{folder}: several pickle files ({', '.join(pickles)}) and no pytorch_model.bin.index.json"
            )
        read = _pickle_tensors
        logger.warning("Loading pickle weights with torch.load(weights_only=True): %s",
                       ", ".join(p.name for p in files))

    tensors, seen = [], {}
    for path in files:
        for tensor in read(path):
            if tensor.name in seen:
                raise ConversionError(f"tensor {tensor.name} is stored twice: in {seen[tensor.name]} and {path.name}")
            seen[tensor.name] = path.name
            tensors.append(tensor)
    for name, shard in (weight_map or {}).items():
        if seen.get(name) != shard:
            raise ConversionError(f"the index names tensor {name} in {shard}, but {folder / shard} does not contain it")
    return tensors


def plan_tensors(
    tensors: list[SourceTensor], family: Family, config: DiffEmbedConfig
) -> list[tuple[str, SourceTensor]]:
    """(DiffEmbed name, source tensor) for every tensor the model needs, checked against the config's shapes."""
    with torch.device("meta"):  # shapes only: no memory
        expected = {name: tuple(p.shape) for name, p in DiffEmbedForEmbedding(config).state_dict().items()}
    target_of = {family.source_name(name): name for name in expected}
    plan, found = [], set()
    for tensor in tensors:
        target = target_of.get(tensor.name)
        if target is None:
            if family.dropped.fullmatch(tensor.name):
                continue
            raise ConversionError(
                f"unexpected tensor {tensor.name} in {tensor.file.name}: not part of a {family.title} checkpoint "
                f"with this config.json (wrong family, or a layer count / bias setting that does not match?)"
            )
        if tensor.shape != expected[target]:
            raise ConversionError(
                f"tensor {tensor.name} in {tensor.file.name} has shape {list(tensor.shape)}, but config.json implies "
                f"{list(expected[target])}"
            )
        plan.append((target, tensor))
        found.add(target)
    missing = [family.source_name(name) for name in expected if name not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConversionError(f"missing tensor(s) in the source weights: {shown}")
    return plan


# ----------------------------------------------------------------------------------------------------------
# Output weights: sharded safetensors written by streaming bytes
# ----------------------------------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like "5GB" (10^9) or "500MiB" (2^20)."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.fullmatch(size.strip().upper())
        if not match:
            raise ConversionError(f"cannot read the size {size!r}; use e.g. '5GB' or '500MiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    if value <= 0:
        raise ConversionError(f"max_shard_size must be positive, got {size!r}")
    return value


def _group_shards(plan: list[tuple[str, SourceTensor]], max_bytes: int) -> list[list[tuple[str, SourceTensor]]]:
    """Consecutive groups under `max_bytes`; a tensor larger than that gets a shard of its own."""
    shards, current, size = [], [], 0
    for entry in plan:
        if current and size + entry[1].nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[1].nbytes
    return shards + [current] if current else shards


class _ByteSource:
    """Copies a source tensor's bytes into an open output file, keeping one source file open at a time."""

    def __init__(self):
        self._path: Optional[Path] = None
        self._file: Optional[BinaryIO] = None
        self._state: Optional[dict] = None

    def copy(self, tensor: SourceTensor, out: BinaryIO):
        if tensor.file != self._path:
            self.close()
            self._path = tensor.file
            if tensor.offset is None:
                self._state = torch.load(tensor.file, map_location="cpu", weights_only=True, mmap=True)
            else:
                self._file = open(tensor.file, "rb")
        if tensor.offset is None:
            data = self._state[tensor.name].contiguous().reshape(-1).view(torch.uint8).numpy()
            for start in range(0, len(data), _CHUNK_BYTES):
                out.write(data[start : start + _CHUNK_BYTES].tobytes())
            return
        self._file.seek(tensor.offset)
        remaining = tensor.nbytes
        while remaining:
            chunk = self._file.read(min(remaining, _CHUNK_BYTES))
            if not chunk:
                raise ConversionError(f"{tensor.file} ends inside tensor {tensor.name}")
            out.write(chunk)
            remaining -= len(chunk)

    def close(self):
        if self._file is not None:
            self._file.close()
        self._path, self._file, self._state = None, None, None


def _write_shard(path: Path, entries: list[tuple[str, SourceTensor]], source: _ByteSource, progress: tqdm):
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in entries:
        header[name] = {"dtype": _ST_CODES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}  # fmt: skip
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for _, tensor in entries:
            source.copy(tensor, out)
            progress.update(1)


def write_weights(folder: Path, plan: list[tuple[str, SourceTensor]], max_shard_size: int) -> list[str]:
    """Write `model.safetensors`, or numbered shards plus `model.safetensors.index.json`; returns file names."""
    shards = _group_shards(plan, max_shard_size)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    source = _ByteSource()
    try:
        with tqdm(total=len(plan), unit="tensor", desc="Converting", disable=None) as progress:
            for name, entries in zip(names, shards):
                _write_shard(folder / name, entries, source, progress)
    finally:
        source.close()
    for name, entries in zip(names, shards):  # read the headers back: the library must accept every file
        with safe_open(str(folder / name), framework="pt") as f:
            if set(f.keys()) != {target for target, _ in entries}:
                raise ConversionError(f"{name} was written incompletely")
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for _, t in plan)},
            "weight_map": {target: name for name, entries in zip(names, shards) for target, _ in entries},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


# ----------------------------------------------------------------------------------------------------------
# Tokenizer, sentence-transformers files, model card
# ----------------------------------------------------------------------------------------------------------

# Remote-code tokenizer classes with a transformers equivalent: Dream's tokenization_dream.DreamTokenizer is
# Qwen2's byte-level BPE over the same vocab.json / merges.txt, so no source code has to run.
_TOKENIZER_SUBSTITUTES = {"DreamTokenizer": Qwen2Tokenizer}


def _load_tokenizer(folder: Path, source_config: dict, trust_remote_code: bool) -> Optional[PreTrainedTokenizerBase]:
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files; the converted folder will have no tokenizer.", folder)
        return None
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
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
    except (OSError, ValueError, TypeError) as err:
        raise ConversionError(f"{folder}: cannot load the tokenizer ({err})") from err


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
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    elif tokenizer.pad_token_id != config.pad_token_id:
        logger.warning("config.json pad_token_id %s differs from the tokenizer's pad token id %s.",
                       config.pad_token_id, tokenizer.pad_token_id)
    if tokenizer.model_max_length > config.max_position_embeddings:
        tokenizer.model_max_length = config.max_position_embeddings


def _model_card(*, out: Path, source: str, hub_id: Optional[str], family: Family, dtype: torch.dtype,
                command: str, max_seq_length: int, window: Optional[int]) -> str:
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:",
             "- diffembed", "- custom_code", "- sentence-transformers", "- feature-extraction"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    kind = ("a diffusion language model" if family.diffusion
            else "an autoregressive LLM, now run with bidirectional attention")
    lines = front + [
        "---", "", f"# {out.name}", "",
        f"A [DiffEmbed](https://arxiv.org/abs/2505.15045) text-embedding model converted from `{source}`: "
        f"{family.title}, {str(dtype).removeprefix('torch.')} weights. The backbone attends bidirectionally; "
        "the embedding is the mean of the final-layer states over the real tokens, L2-normalised.", "",
        f"**Not trained as an embedder.** The weights are those of {kind}, unchanged (the language-model head is "
        "dropped). Fine-tune it contrastively, as in the DiffEmbed study, before relying on its embeddings.", "",
    ]
    if window is not None:
        lines += [f"**Sliding window ignored.** The source was trained with a {window}-token sliding window; this "
                  "model attends over the whole text, which matches the source only up to that length.", ""]
    lines += [
        "## Usage", "", "```python", "from transformers import AutoModel, AutoTokenizer", "",
        f'model = AutoModel.from_pretrained("{out.name}", trust_remote_code=True)',
        f'tokenizer = AutoTokenizer.from_pretrained("{out.name}", trust_remote_code=True)',
        'batch = tokenizer(["a query", "a document"], padding=True, truncation=True, '
        f'max_length={max_seq_length}, return_tensors="pt")',
        "embeddings = model(**batch).embeddings  # [2, hidden], float32, L2-normalised", "```", "",
    ]
    lines += ["```python", "from sentence_transformers import SentenceTransformer", "",
              f'model = SentenceTransformer("{out.name}", trust_remote_code=True)',
              'embeddings = model.encode(["a query", "a document"])', "```", ""]
    lines += ["## Conversion", "", "```bash", command, "```", "", f"diffembed-hf {__version__}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Source resolution and the atomic output folder
# ----------------------------------------------------------------------------------------------------------


def _resolve_source(src: str | os.PathLike, revision: Optional[str], allow_pickle: bool) -> tuple[Path, Optional[str]]:
    """A local folder, or a Hub id downloaded (safetensors, config, tokenizer; never .bin unless allowed)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path} is a file; the source must be a checkpoint folder or a Hub id")
        return path, None
    repo_id = str(src)
    if not _HUB_ID.fullmatch(repo_id):
        raise ConversionError(f"source folder {path} does not exist (and {repo_id!r} is not a Hub id)")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import OfflineModeIsEnabled

    patterns = ["config.json", "*.safetensors.index.json", *_TOKENIZER_FILES, "*.tiktoken", "tokenization_*.py",
                *_LICENSE_PATTERNS, "model*.safetensors"]
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


def _remove_stale_temp_folders(out: Path):
    """Remove temporary folders that a killed conversion to `out` left behind (their process is gone)."""
    for path in out.parent.glob(f".{out.name}.tmp-*"):
        match = re.match(rf"\.{re.escape(out.name)}\.tmp-(\d+)-", path.name)
        if match and not _process_alive(int(match.group(1))):
            logger.info("Removing %s, left by an interrupted conversion.", path)
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    return True


def _move_into_place(tmp: Path, out: Path):
    """Rename the finished folder to `out`; an existing `out` is replaced only now, once the new one is whole."""
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


# ----------------------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------------------


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    family: Optional[str] = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    max_seq_length: Optional[int] = None,
    allow_pickle: bool = False,
    ignore_sliding_window: bool = False,
    trust_remote_code: bool = False,
    revision: Optional[str] = None,
) -> Path:
    """Convert a Dream / LLaDA / Qwen2 / Llama / Mistral checkpoint into a DiffEmbed folder at `out`.

    Args:
        src: a local checkpoint folder (config.json, safetensors weights, tokenizer files) or a Hub id.
        out: the folder to create. It must not exist unless `overwrite`, which replaces it only once the new
            folder is complete.
        family: force the source family (one of `FAMILIES`) instead of reading config.json's model_type.
        max_shard_size: output shard cap in bytes or as "5GB" / "500MiB".
        max_seq_length: sentence-transformers' truncation length; defaults to min(source max positions, 4096).
        allow_pickle: accept `.bin` weights, loaded with `torch.load(weights_only=True)`.
        ignore_sliding_window: convert a sliding-window source (Mistral v0.1) to full attention.
        trust_remote_code: let a tokenizer with remote code run it (Dream's needs none: Qwen2's is used).
        revision: Hub revision, for a Hub id.

    Returns the output folder. Raises `ConversionError` (naming the file, key or tensor) and leaves no `out`.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a folder")
    shard_bytes = parse_size(max_shard_size)
    folder, hub_id = _resolve_source(src, revision, allow_pickle)
    if folder.resolve() == out.resolve() or out.resolve() in folder.resolve().parents:
        raise ConversionError(f"the output {out} must not contain the source {folder}")

    config_path = folder / "config.json"
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
    logger.info("Converting %s as %s.", src, fam.title)
    window = _sliding_window_cap(source_config, fam, config_path, ignore_sliding_window)

    tensors = read_source_tensors(folder, allow_pickle)
    dtype = next((t.dtype for t in tensors if t.name == fam.source_name("model.embed_tokens.weight")), torch.float32)
    config = _build_config(source_config, fam, config_path, dtype)
    plan = plan_tensors(tensors, fam, config)
    requested_length = max_seq_length
    if max_seq_length is None:
        max_seq_length = min(config.max_position_embeddings, window or math.inf, DEFAULT_MAX_SEQ_LENGTH)
    elif not 0 < max_seq_length <= config.max_position_embeddings:
        raise ConversionError(f"max_seq_length must be in [1, {config.max_position_embeddings}], got {max_seq_length}")
    tokenizer = _load_tokenizer(folder, source_config, trust_remote_code)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        if tokenizer is not None:
            _prepare_tokenizer(tokenizer, config)
            tokenizer.save_pretrained(tmp)
        config.save_pretrained(tmp)
        for module in (configuration_diffembed, modeling_diffembed):
            shutil.copyfile(module.__file__, tmp / Path(module.__file__).name)
        for pattern in _LICENSE_PATTERNS:
            for path in folder.glob(pattern):
                shutil.copyfile(path, tmp / path.name)
        write_weights(tmp, plan, shard_bytes)
        write_sentence_transformer_files(tmp, max_seq_length=max_seq_length)
        options = {"--family": family, "--revision": revision, "--max-seq-length": requested_length,
                   "--ignore-sliding-window": window is not None, "--allow-pickle": tensors[0].offset is None,
                   "--trust-remote-code": trust_remote_code}  # fmt: skip
        command = " ".join(["diffembed convert", str(src), out.name] + [
            flag if value is True else f"{flag} {value}" for flag, value in options.items() if value
        ])
        card = _model_card(out=out, source=hub_id or str(src), hub_id=hub_id, family=fam, dtype=dtype,
                           command=command, max_seq_length=max_seq_length, window=window)
        (tmp / "README.md").write_text(card)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote %s", out)
    return out


__all__ = ["ConversionError", "FAMILIES", "Family", "convert_checkpoint", "detect_family", "parse_size"]
