"""Weights: every source header read and validated first, then the tensor bytes streamed into safetensors shards.

No tensor, shard or model is ever materialised: bytes are copied from the source files to the output shards in
16 MiB chunks, keeping each tensor's dtype, so peak memory is the imports plus one chunk whatever the
checkpoint size. Pickle sources (only when allowed) are memory-mapped one shard at a time.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from ..model_folder import inside
from ..errors import ConversionError
from ..modeling.configuration_diffembed import DiffEmbedConfig
from ..modeling.modeling_diffembed import DiffEmbedForEmbedding
from .families import Family

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"
_CHUNK_BYTES = 16 * 2**20
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# safetensors' dtype codes. Bytes are copied verbatim, so every dtype the format knows passes through.
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}


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
        inside(folder, name, what=str(index_path))  # a shard named outside the folder is never read
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

