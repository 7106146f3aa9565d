"""GGUF sources: a `.gguf` file (llama.cpp's format, often quantized) read through transformers' own GGUF loading.

transformers reads a GGUF file into its own model class (`from_pretrained(folder, gguf_file=NAME)`): it
dequantizes every tensor with the `gguf` package, reverses llama.cpp's Q/K permutation and renames the tensors,
and builds the config and a fast tokenizer from the file's metadata. We use exactly that, write the result as an
ordinary transformers checkpoint (config.json, safetensors, tokenizer files) in a hidden folder beside the output,
and convert that folder like any other source (`folder.convert_checkpoint`), so a GGUF model ends up in the same
DiffEmbed folder, card and sentence-transformers files as a safetensors one.

A dequantized 4-bit model is not the original model: the source's quantization type goes into the conversion
record (`diffembed_conversion.json`) and onto the card.

Memory: transformers dequantizes every tensor of the file before it loads the model, so the peak is about 2.5x
the dequantized model at the dtype asked for (measured: 1.3 GiB for SmolLM2-135M in float32, a 0.5 GiB model),
not the bounded streaming of safetensors sources; the checkpoint written from it is then streamed as usual.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import shutil
import struct
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import ConversionError, UsageError, require_extra
from ..outputs import remove_stale_temp_folders, temporary_sibling
from ..validation import is_non_negative_int, is_positive_int

logger = logging.getLogger(__name__)

# GGUF architecture (general.architecture) -> the family it converts as. llama.cpp writes Mistral models as
# "llama"; transformers tells them apart by general.name, and both convert the same way.
CONVERTIBLE_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
GGUF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_GGUF_DTYPE = "float32"  # the dequantized values exactly; bfloat16 halves the size of a large model


@dataclass
class GGUFInfo:
    """What a GGUF file holds, read from its header (no tensor is read)."""

    path: Path
    architecture: str
    quantization: str  # the file's type (general.file_type), e.g. Q4_1, Q8_0, F16
    tensor_types: dict[str, int]  # tensor type -> how many tensors have it
    name: str | None
    license: str | None
    header: GGUFHeader | None = None

    def record(self, dtype: str) -> dict:
        """The conversion record's `gguf` entry."""
        return {"file": self.path.name, "architecture": self.architecture, "quantization": self.quantization,
                "tensor_types": self.tensor_types, "dequantized_to": dtype, "name": self.name,
                "license": self.license}


def find_gguf_file(src: str | Path, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a conversion source names: SRC itself (a .gguf file), SRC/GGUF_FILE, or the one .gguf file of
    a folder without config.json. None for any other source (a checkpoint folder, a Hub id)."""
    path = Path(src).expanduser()
    if gguf_file is not None:
        if not path.is_dir():
            raise UsageError(f"--gguf-file {gguf_file}: the source {src} must be the folder that holds it")
        found = path / gguf_file
        if not found.is_file():
            raise UsageError(f"--gguf-file {gguf_file}: no such file in {path}")
        return found
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(f"{src} is a file but not a .gguf file; give a checkpoint folder, a Hub id or a "
                             "MODEL.gguf file")
        return path
    if path.is_dir() and not (path / "config.json").is_file():
        # any case, as a single file is taken (X.GGUF): a folder holding one is that file
        candidates = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            names = ", ".join(p.name for p in candidates)
            raise UsageError(f"{path} holds several GGUF files ({names}) and no config.json: name one with "
                             "--gguf-file NAME")
    return None


# ----------------------------------------------------------------------------------------------------------
# The header, read with every count and size checked against the file's length
# ----------------------------------------------------------------------------------------------------------
# A GGUF header is untrusted: the readers of the `gguf` package and of transformers allocate what its counts say
# (an array length of 2^40 ran for minutes and took gigabytes; block_count 100000 built a model of 100000 layers
# before any tensor was read). So it is walked here first, each count and size checked against the bytes that
# are left, and the metadata checked against the tensors, before anything reads it.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_INTEGERS = (0, 1, 2, 3, 4, 5, 10, 11)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SUPPORTED_TOKENIZERS = ("gpt2", "llama")  # byte-level BPE and SentencePiece, as these architectures' files use


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, by element type and count (its values are not kept)."""

    item_type: int
    count: int


@dataclass(frozen=True)
class GGUFTensor:
    shape: tuple[int, ...]  # ggml order: the fastest-moving dimension (a matrix's input width) first
    type: int
    offset: int
    nbytes: int


@dataclass
class GGUFHeader:
    """A GGUF file's metadata (scalars and strings by value, arrays as `GGUFArray`) and tensor table."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


class _Cursor:
    """Reads a header from a memory map; every read first checks that the file holds that many more bytes."""

    def __init__(self, path: Path, blob, size: int):
        self.path, self.blob, self.size, self.pos = path, blob, size, 0

    def fail(self, message: str) -> ConversionError:
        return ConversionError(f"{self.path}: not a readable GGUF file: {message}")

    def left(self) -> int:
        return self.size - self.pos

    def skip(self, count: int, field: str) -> int:
        if count > self.left():
            raise self.fail(f"cut short inside its header ({field} needs {count:,} bytes at byte {self.pos:,}; the "
                            f"file has {self.size:,})")
        start, self.pos = self.pos, self.pos + count
        return start

    def unpack(self, fmt: str, field: str):
        return struct.unpack_from(fmt, self.blob, self.skip(struct.calcsize(fmt), field))[0]

    def string(self, field: str) -> str:
        length = self.unpack("<Q", f"the length of {field}")
        start = self.skip(length, field)
        try:
            return self.blob[start:start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{field} is not UTF-8 text") from None

    def count(self, field: str, smallest: int) -> int:
        """A count of items of at least `smallest` bytes each, refused if the rest of the file cannot hold them."""
        count = self.unpack("<Q", field)
        if count * smallest > self.left():
            raise self.fail(f"{field} is {count:,}, more than the {self.left():,} bytes left can hold: the file is "
                            "cut short or its header is damaged")
        return count

    def value(self, value_type: int, field: str) -> Any:
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type], field)
        if value_type == _STRING:
            return self.string(field)
        if value_type != _ARRAY:
            raise self.fail(f"{field} has the unknown value type {value_type}")
        item_type = self.unpack("<I", f"the element type of {field}")
        if item_type in _SCALARS:
            count = self.count(f"the length of {field}", struct.calcsize(_SCALARS[item_type]))
            self.skip(count * struct.calcsize(_SCALARS[item_type]), field)
        elif item_type == _STRING:
            count = self.count(f"the length of {field}", 8)
            for index in range(count):
                self.string(f"{field}[{index}]")
        elif item_type == _ARRAY:
            count = self.count(f"the length of {field}", 12)
            for index in range(count):
                self.value(_ARRAY, f"{field}[{index}]")
        else:
            raise self.fail(f"{field} is an array of the unknown type {item_type}")
        return GGUFArray(item_type, count)


def read_gguf_header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file, every count and size checked against the file's length
    before it is used (`ConversionError` naming the file and the field otherwise); no tensor data is read."""
    require_extra("gguf")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 24:
                raise ConversionError(f"{path}: not a readable GGUF file: {size} bytes, shorter than a GGUF header")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                return _read_header(_Cursor(path, blob, size), GGML_QUANT_SIZES, GGMLQuantizationType)
    except OSError as err:
        raise ConversionError(f"{path}: not a readable GGUF file ({err.strerror or err})") from None


def _read_header(cursor: _Cursor, sizes: dict, types) -> GGUFHeader:
    if cursor.blob[:4] != b"GGUF":
        raise cursor.fail("it does not start with the GGUF magic bytes")
    cursor.pos = 4
    version = cursor.unpack("<I", "the version")
    if version not in (2, 3):
        raise cursor.fail(f"GGUF version {version}; versions 2 and 3 are read")
    tensor_count = cursor.unpack("<Q", "the tensor count")
    metadata_count = cursor.count("the metadata count", 8 + 4 + 1)
    if tensor_count * (8 + 4 + 8 + 4 + 8) > cursor.left():
        raise cursor.fail(f"the tensor count is {tensor_count:,}, more than the {cursor.left():,} bytes left can "
                          "hold: the file is cut short or its header is damaged")
    metadata: dict[str, Any] = {}
    for index in range(metadata_count):
        key = cursor.string(f"the key of metadata entry {index}")
        if key in metadata:
            raise cursor.fail(f"the metadata key {key} appears twice")
        metadata[key] = cursor.value(cursor.unpack("<I", f"the type of {key}"), key)
    tensors: dict[str, GGUFTensor] = {}
    known = {int(t) for t in sizes}
    for index in range(tensor_count):
        name = cursor.string(f"the name of tensor {index}")
        dims = cursor.unpack("<I", f"the dimension count of tensor {name}")
        if not 1 <= dims <= _MAX_DIMS:
            raise cursor.fail(f"tensor {name} has {dims} dimensions (1 to {_MAX_DIMS} are possible)")
        shape = tuple(cursor.unpack("<Q", f"dimension {d} of tensor {name}") for d in range(dims))
        tensor_type = cursor.unpack("<I", f"the type of tensor {name}")
        offset = cursor.unpack("<Q", f"the data offset of tensor {name}")
        if tensor_type not in known:
            raise cursor.fail(f"tensor {name} has the unknown ggml type {tensor_type}")
        block, block_bytes = sizes[types(tensor_type)]
        if min(shape) < 1 or shape[0] % block:
            raise cursor.fail(f"tensor {name} has the shape {list(shape)}, which {types(tensor_type).name} cannot hold")
        if name in tensors:
            raise cursor.fail(f"the tensor {name} appears twice")
        tensors[name] = GGUFTensor(shape, tensor_type, offset, math.prod(shape) // block * block_bytes)
    alignment = metadata.get("general.alignment", 32)
    if not is_positive_int(alignment) or alignment & (alignment - 1):
        raise cursor.fail(f"general.alignment is {alignment!r}, not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    for name, tensor in tensors.items():
        end = data_start + tensor.offset + tensor.nbytes
        if tensor.offset % alignment or end > cursor.size:
            raise cursor.fail(f"the data of tensor {name} ({tensor.nbytes:,} bytes at offset {tensor.offset:,}) lies "
                              f"{'off the alignment' if tensor.offset % alignment else 'past the end of the file'} "
                              f"({cursor.size:,} bytes): the file is cut short or its header is damaged")
    return GGUFHeader(cursor.path, metadata, tensors)


def read_gguf_info(path: Path) -> GGUFInfo:
    """The architecture, quantization and tensor types of a GGUF file, from its header (`read_gguf_header`)."""
    from gguf import GGMLQuantizationType, LlamaFileType

    header = read_gguf_header(path)
    return _info(header, GGMLQuantizationType, LlamaFileType)


def _info(header: GGUFHeader, types, file_types) -> GGUFInfo:
    def text(key: str) -> str | None:
        value = header.metadata.get(key)
        return value if isinstance(value, str) else None

    architecture = text("general.architecture")
    if architecture is None:
        raise ConversionError(f"{header.path}: no general.architecture (text) in its metadata, so what model it holds "
                              "is unknown")
    tensor_types = dict(sorted(Counter(types(t.type).name for t in header.tensors.values()).items()))
    file_type = header.metadata.get("general.file_type")
    try:  # MOSTLY_Q4_1 -> Q4_1; ALL_F32 -> F32
        quantization = file_types(file_type).name.split("_", 1)[1] if isinstance(file_type, int) else None
    except ValueError:
        quantization = None
    if quantization is None:  # no (known) file type: the most common tensor type among the matrices
        matrices = Counter(types(t.type).name for t in header.tensors.values() if len(t.shape) > 1)
        quantization = matrices.most_common(1)[0][0] if matrices else "unknown"
    return GGUFInfo(path=header.path, architecture=architecture, quantization=quantization,
                    tensor_types=tensor_types, name=text("general.name"), license=text("general.license"),
                    header=header)


# The tensors of one layer of the architectures DiffEmbed converts, in ggml order (input width first): each
# shape spelled with h (embedding_length), f (feed_forward_length), q (head_count x head size) and k
# (head_count_kv x head size).
_LAYER_TENSORS = {
    "attn_norm.weight": ("h",), "attn_q.weight": ("h", "q"), "attn_k.weight": ("h", "k"),
    "attn_v.weight": ("h", "k"), "attn_output.weight": ("q", "h"), "ffn_norm.weight": ("h",),
    "ffn_gate.weight": ("h", "f"), "ffn_up.weight": ("h", "f"), "ffn_down.weight": ("f", "h"),
}  # fmt: skip
_QKV_BIASES = {"attn_q.bias": ("q",), "attn_k.bias": ("k",), "attn_v.bias": ("k",)}


def check_gguf_contents(info: GGUFInfo) -> None:
    """Refuse, naming the file and the field, a GGUF file whose metadata and tensors disagree: every tensor
    its metadata implies must be there with the implied shape (transformers would fill a missing one with random
    values or zeros, and build as many layers as block_count says before reading any tensor), no layer beyond
    block_count, and a tokenizer transformers can build (its vocabulary one row of the embedding per token)."""
    header, arch, path = info.header, info.architecture, info.path
    metadata = header.metadata

    def number(key: str, default: int | None = None) -> int:
        value = metadata.get(f"{arch}.{key}", default)
        if not is_positive_int(value):
            shown = "missing" if value is None else f"{value!r}"
            raise ConversionError(f"{path}: the metadata {arch}.{key} is {shown}; a positive whole number is needed")
        return value

    layers, hidden = number("block_count"), number("embedding_length")
    feed_forward, heads = number("feed_forward_length"), number("attention.head_count")
    kv_heads = number("attention.head_count_kv", heads)
    head_size = metadata.get(f"{arch}.rope.dimension_count") if arch != "qwen2" else None
    head_size = number("rope.dimension_count") if head_size is not None else hidden // heads
    if heads % kv_heads or not head_size:
        raise ConversionError(f"{path}: {arch}.attention.head_count ({heads}) is not a multiple of "
                              f"{arch}.attention.head_count_kv ({kv_heads}), or the heads do not divide "
                              f"{arch}.embedding_length ({hidden})")
    vocabulary = _check_tokenizer(info)
    vocab_size = number("vocab_size", vocabulary)
    if vocab_size != vocabulary:
        raise ConversionError(f"{path}: {arch}.vocab_size is {vocab_size:,} but tokenizer.ggml.tokens lists "
                              f"{vocabulary:,} tokens")
    width = {"h": hidden, "f": feed_forward, "q": heads * head_size, "k": kv_heads * head_size, "v": vocab_size}

    def implied() -> Iterator[tuple[str, tuple[str, ...]]]:  # one at a time: block_count may be anything
        yield from {"token_embd.weight": ("h", "v"), "output_norm.weight": ("h",)}.items()
        if "output.weight" in header.tensors:  # absent: tied to the embedding
            yield "output.weight", ("h", "v")
        for layer in range(layers):
            for name, shape in (*_LAYER_TENSORS.items(), *(_QKV_BIASES.items() if arch == "qwen2" else ())):
                yield f"blk.{layer}.{name}", shape

    for name, letters in implied():
        tensor = header.tensors.get(name)
        if tensor is None:
            raise ConversionError(f"{path}: lacking the tensor {name}, which its metadata implies "
                                  f"({arch}.block_count {layers}); the file is incomplete or not the model it says")
        expected = tuple(width[letter] for letter in letters)
        if tensor.shape != expected:
            names = {"h": f"{arch}.embedding_length", "f": f"{arch}.feed_forward_length",
                     "q": f"{arch}.attention.head_count", "k": f"{arch}.attention.head_count_kv",
                     "v": "tokenizer.ggml.tokens"}
            fields = ", ".join(dict.fromkeys(names[letter] for letter in letters))
            raise ConversionError(f"{path}: tensor {name} has the shape {list(tensor.shape)}, but its metadata "
                                  f"({fields}) implies {list(expected)}")
    beyond = sorted(name for name in header.tensors
                    if name.startswith("blk.") and name.split(".")[1].isdigit() and int(name.split(".")[1]) >= layers)
    if beyond:
        raise ConversionError(f"{path}: holds the tensor {beyond[0]}, beyond {arch}.block_count {layers}; the "
                              "metadata and the tensors disagree")


def _check_tokenizer(info: GGUFInfo) -> int:
    """The number of tokens, after checking the tokenizer metadata that transformers builds a tokenizer from."""
    metadata, path = info.header.metadata, info.path
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise ConversionError(f"{path}: no tokenizer in its metadata (tokenizer.ggml.model is missing); a DiffEmbed "
                              "folder needs the model's own tokenizer")
    if model not in _SUPPORTED_TOKENIZERS:
        raise ConversionError(f"{path}: the tokenizer type tokenizer.ggml.model is {model!r}; transformers builds "
                              f"{' and '.join(_SUPPORTED_TOKENIZERS)} tokenizers from GGUF files of "
                              f"{info.architecture}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, GGUFArray) or tokens.item_type != _STRING or tokens.count < 1:
        raise ConversionError(f"{path}: the tokenizer's vocabulary tokenizer.ggml.tokens is missing or not a list of "
                              "texts")
    for key, item_types in (("tokenizer.ggml.scores", (6,)), ("tokenizer.ggml.token_type", _INTEGERS)):
        value = metadata.get(key)
        if value is not None and not (isinstance(value, GGUFArray) and value.item_type in item_types
                                      and value.count == tokens.count):
            raise ConversionError(f"{path}: the tokenizer's {key} is not one number per token "
                                  f"({tokens.count:,} tokens in tokenizer.ggml.tokens)")
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is not None and not (isinstance(merges, GGUFArray) and merges.item_type == _STRING):
        raise ConversionError(f"{path}: the tokenizer's tokenizer.ggml.merges is not a list of texts")
    if merges is None and "tokenizer.ggml.scores" not in metadata:
        raise ConversionError(f"{path}: the {model} tokenizer has neither tokenizer.ggml.merges nor "
                              "tokenizer.ggml.scores, so its merges cannot be built")
    for role in ("bos", "eos", "unknown", "padding"):
        key = f"tokenizer.ggml.{role}_token_id"
        value = metadata.get(key)
        if value is not None and (not is_non_negative_int(value) or value >= tokens.count):
            raise ConversionError(f"{path}: the tokenizer's {key} is {value!r}, not one of its {tokens.count:,} "
                                  "tokens")
    return tokens.count


def check_architecture(info: GGUFInfo) -> None:
    """Refuse, by name, an architecture that transformers cannot read from GGUF or that DiffEmbed cannot convert."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    convertible = ", ".join(sorted(CONVERTIBLE_ARCHITECTURES))
    if info.architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ConversionError(f"{info.path.name}: transformers cannot read the GGUF architecture "
                              f"{info.architecture!r} (it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); "
                              f"DiffEmbed converts {convertible}")
    if info.architecture not in CONVERTIBLE_ARCHITECTURES:
        raise ConversionError(f"{info.path.name}: GGUF architecture {info.architecture!r} cannot be converted; "
                              f"DiffEmbed converts {convertible} GGUF files")


def dequantize_to_checkpoint(info: GGUFInfo, folder: Path, dtype: str = DEFAULT_GGUF_DTYPE) -> None:
    """Write the GGUF model as a transformers checkpoint folder (config.json, safetensors weights, tokenizer),
    dequantized to `dtype` by transformers' own GGUF loading."""
    if dtype not in GGUF_DTYPES:
        raise UsageError(f"--dtype {dtype!r}: choose one of {', '.join(GGUF_DTYPES)}")
    require_extra("gguf")
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    check_architecture(info)
    logger.info("Dequantizing %s (%s, %s) to %s with transformers' GGUF loader.", info.path.name, info.architecture,
                info.quantization, dtype)
    check_gguf_contents(info)  # before transformers allocates what the metadata says
    try:
        tokenizer = AutoTokenizer.from_pretrained(info.path.parent, gguf_file=info.path.name)
    except Exception as err:  # noqa: BLE001 - its builders raise RuntimeError, KeyError, the Rust library Exception
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ConversionError(f"{info.path}: transformers could not build the tokenizer from its metadata "
                              f"(tokenizer.ggml.*): {type(err).__name__}: {reason}") from err
    try:
        model = AutoModelForCausalLM.from_pretrained(info.path.parent, gguf_file=info.path.name,
                                                     dtype=GGUF_DTYPES[dtype])
    except (ValueError, OSError, NotImplementedError, RuntimeError, KeyError) as err:
        raise ConversionError(f"{info.path.name}: transformers could not load it ({err})") from err
    # transformers marks the model "quantized with gguf" and will not save_pretrained it, although its weights are
    # plain tensors now: the state dict is written directly (a tied LM head once, as the embedding), and the
    # config without the "gguf" quantization entry, which would make loaders look for the file.
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()
             if not (tied and name == "lm_head.weight")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del state, model
    tokenizer.save_pretrained(folder)
    config = AutoConfig.from_pretrained(info.path.parent, gguf_file=info.path.name).to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@contextmanager
def dequantized_checkpoint(path: Path, out: Path, dtype: str | None) -> Iterator[tuple[Path, GGUFInfo]]:
    """The GGUF file as a transformers checkpoint in a hidden folder beside `out` (removed afterwards, and by the
    next conversion to `out` if this process is killed), with what the file holds."""
    info = read_gguf_info(path)
    check_architecture(info)
    check_gguf_contents(info)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(out)
    staged = temporary_sibling(out)
    staged.mkdir()
    try:
        dequantize_to_checkpoint(info, staged, dtype or DEFAULT_GGUF_DTYPE)
        yield staged, info
    finally:
        shutil.rmtree(staged, ignore_errors=True)
