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
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import ConversionError, UsageError, require_extra
from ..files import remove_stale_temp_folders, temporary_sibling

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
        candidates = sorted(path.glob("*.gguf"))
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            names = ", ".join(p.name for p in candidates)
            raise UsageError(f"{path} holds several GGUF files ({names}) and no config.json: name one with "
                             "--gguf-file NAME")
    return None


def read_gguf_info(path: Path) -> GGUFInfo:
    """The architecture, quantization and tensor types of a GGUF file, from its header."""
    require_extra("gguf")
    from gguf import GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise ConversionError(f"{path}: not a readable GGUF file ({err})") from None

    def field(key):
        return reader.fields[key].contents() if key in reader.fields else None

    tensor_types = dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))
    file_type = field("general.file_type")
    try:  # MOSTLY_Q4_1 -> Q4_1; ALL_F32 -> F32
        quantization = LlamaFileType(file_type).name.split("_", 1)[1] if file_type is not None else None
    except ValueError:
        quantization = None
    if quantization is None:  # no (known) file type: the most common tensor type among the matrices
        matrices = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
        quantization = matrices.most_common(1)[0][0] if matrices else "unknown"
    return GGUFInfo(path=path, architecture=str(field("general.architecture")), quantization=quantization,
                    tensor_types=tensor_types, name=field("general.name"), license=field("general.license"))


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
    try:
        model = AutoModelForCausalLM.from_pretrained(info.path.parent, gguf_file=info.path.name,
                                                     dtype=GGUF_DTYPES[dtype])
        tokenizer = AutoTokenizer.from_pretrained(info.path.parent, gguf_file=info.path.name)
    except (ValueError, OSError, NotImplementedError) as err:
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
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_folders(out)
    staged = temporary_sibling(out)
    staged.mkdir()
    try:
        dequantize_to_checkpoint(info, staged, dtype or DEFAULT_GGUF_DTYPE)
        yield staged, info
    finally:
        shutil.rmtree(staged, ignore_errors=True)
