"""Encoding texts with a DiffEmbed model through sentence-transformers, with the checks users expect.

`SentenceTransformer.encode` already sorts by length, batches, and releases each batch; on top of it this adds
what it lacks for long-document embedders: a clear error for a bad item, a warning when texts are truncated
(sentence-transformers cuts them silently), bf16 weights on CUDA by default, a progress bar on long inputs, and
FP8 linear layers (torchao) on GPUs that have FP8 tensor cores.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from . import register_auto_classes
from .compact import CalibrationRanges, Compaction, CompactError, check_truncate_dim
from .errors import DiffembedError, UsageError

logger = logging.getLogger(__name__)


register_auto_classes()


class PromptNameError(UsageError, ValueError):
    """A prompt name the model does not store."""


PROGRESS_BAR_MIN_TEXTS = 256  # below this a progress bar is noise
QUANTIZATIONS = ("fp8",)
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper / Blackwell: the first GPUs with FP8 tensor cores
FP8_MIN_TORCH = (2, 5)  # torch._scaled_mm with per-row scales
FP8_MIN_TORCHAO = (0, 13)
FP8_MIN_SENTENCE_TRANSFORMERS = (6, 0)
FP8_EXTRA = "pip install 'diffembed-hf[fp8]'"


class QuantizationUnavailable(DiffembedError, RuntimeError):
    """The requested quantization cannot run on this machine or with these packages; the message says why."""


def load_encoder(
    model_name_or_path: str,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    max_seq_length: int | None = None,
    quantize: str | None = None,
    truncate_dim: int | None = None,
    **kwargs,
) -> SentenceTransformer:
    """Load a DiffEmbed folder or Hub id as a `SentenceTransformer` (remote code trusted).

    Weights default to bfloat16 on CUDA (float16 overflows in Qwen-family models) and float32 elsewhere;
    the model pools and normalises in float32 whatever the weights' dtype. `quantize="fp8"` runs every linear
    layer with dynamic per-row FP8 activations and weights (torchao) and keeps the rest in bfloat16; where
    that cannot run, `QuantizationUnavailable` says why before anything is loaded. `truncate_dim` keeps the first
    dimensions of every vector (a Matryoshka-trained model loses little; `encode` renormalises them); by default the
    one stored in the folder's `config_sentence_transformers.json`, if any. A dimension larger than the model's is
    refused.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; use one of {QUANTIZATIONS} or None")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if quantize == "fp8":
        check_fp8_support(device, dtype)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" or quantize else torch.float32
    model_kwargs = {"dtype": dtype, **kwargs.pop("model_kwargs", {})}
    model = SentenceTransformer(
        model_name_or_path, device=device, trust_remote_code=True, model_kwargs=model_kwargs, **kwargs
    )
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    set_truncate_dim(model, model_name_or_path, truncate_dim)
    if quantize == "fp8":
        quantize_fp8(model[0].auto_model)
    return model


def embedding_width(model: SentenceTransformer) -> int:
    """The model's full embedding dimension (before any truncation)."""
    return int(model[0].auto_model.config.hidden_size)


def set_truncate_dim(model: SentenceTransformer, name: str, truncate_dim: int | None) -> None:
    """`model.truncate_dim`: the one asked for, else the folder's stored one (sentence-transformers reads it from
    `config_sentence_transformers.json` since 5.4; read here for older versions), checked against the width."""
    if truncate_dim is None:
        truncate_dim = getattr(model, "truncate_dim", None) or _stored_truncate_dim(name)
    model.truncate_dim = check_truncate_dim(truncate_dim, embedding_width(model))


def _stored_truncate_dim(name: str) -> int | None:
    path = Path(name).expanduser() / "config_sentence_transformers.json"
    if not path.is_file():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config_sentence_transformers.json") if "/" in name else None
        path = Path(cached) if isinstance(cached, str) else None
    if path is None:
        return None
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8")).get("truncate_dim")
    except (OSError, ValueError, AttributeError):
        return None


def max_positions(model: SentenceTransformer) -> int | None:
    """The longest input the model's positions allow (`max_position_embeddings`), if its config says."""
    config = getattr(model[0].auto_model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def save_embeddings(embeddings: np.ndarray, output: str | Path) -> Path:
    """Write `.npy` or `.safetensors` (key "embeddings") through a hidden temporary file renamed into place, so a
    reader never sees a half-written file; the file gets the user's umask like any other."""
    from .files import move_into_place, temporary_sibling

    output = Path(output)
    partial = temporary_sibling(output, "partial")
    try:
        if output.suffix == ".npy":
            with open(partial, "wb") as handle:
                np.save(handle, embeddings)
        else:
            from safetensors.numpy import save_file

            save_file({"embeddings": np.ascontiguousarray(embeddings)}, str(partial))
        move_into_place(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return output


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2] if part.isdigit())


def check_fp8_support(device: str | torch.device, dtype: torch.dtype | None = None) -> None:
    """Raise `QuantizationUnavailable` listing every reason FP8 inference cannot run here, or return."""
    problems = []
    if dtype not in (None, torch.bfloat16):
        problems.append(f"FP8 keeps the rest of the model in bfloat16, but dtype={dtype} was requested; leave "
                        "dtype unset")
    device = torch.device(device)
    if device.type != "cuda":
        problems.append(f"it needs a CUDA GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                        f"or newer (Ada, Hopper, Blackwell), and the device is {str(device)!r}")
    elif not torch.cuda.is_available():
        problems.append(f"no CUDA GPU is available (torch {torch.__version__}, CUDA build {torch.version.cuda})")
    else:
        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < FP8_MIN_CAPABILITY:
            problems.append(
                f"it needs compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (FP8 tensor "
                f"cores: Ada, Hopper, Blackwell), and {torch.cuda.get_device_name(device)} has "
                f"{capability[0]}.{capability[1]}"
            )
    import sentence_transformers

    if _version(sentence_transformers.__version__) < FP8_MIN_SENTENCE_TRANSFORMERS:
        # 5.x moves the model to its device at every encode call; torchao's FP8 weights cannot be swapped there
        problems.append(f"sentence-transformers {sentence_transformers.__version__} moves the model at every "
                        "encode call, which FP8 weights do not survive; FP8 needs sentence-transformers >= 6: "
                        f"{FP8_EXTRA}")
    if _version(torch.__version__) < FP8_MIN_TORCH:
        problems.append(f"torch {torch.__version__} is too old; FP8 needs torch >= "
                        f"{'.'.join(map(str, FP8_MIN_TORCH))}")
    try:
        with _quiet_loggers("torchao", "torch.utils._pytree"):  # import-time notes about unrelated extensions
            import torchao
    except ImportError:
        problems.append(f"it needs torchao, which is not installed: {FP8_EXTRA}")
    else:
        if _version(torchao.__version__) < FP8_MIN_TORCHAO:
            problems.append(f"torchao {torchao.__version__} is too old; FP8 needs torchao >= "
                            f"{'.'.join(map(str, FP8_MIN_TORCHAO))}: pip install -U 'diffembed-hf[fp8]'")
    if problems:
        raise QuantizationUnavailable("quantize='fp8' cannot run here: " + "; ".join(problems) + ".")


def quantize_fp8(module: torch.nn.Module) -> int:
    """Replace the weights of `module`'s linear layers with torchao's dynamic per-row FP8 (e4m3) quantization of
    activations and weights, in place; return how many layers were quantized. Call `check_fp8_support` first."""
    with _quiet_loggers("torchao", "torch.utils._pytree"):  # import-time notes about unrelated extensions
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    before = {m: type(m.weight) for m in module.modules() if isinstance(m, torch.nn.Linear)}
    quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    quantized = sum(type(m.weight) is not kind for m, kind in before.items())  # a Float8Tensor now
    linears = list(before)
    skipped = len(linears) - quantized
    if skipped:  # torchao leaves layers whose sizes are not multiples of 16 in bf16
        logger.warning("FP8: %d of %d linear layers stay in bfloat16 (sizes not multiples of 16)", skipped,
                       len(linears))
    logger.info("FP8: %d linear layers quantized (dynamic per-row activations and weights)", quantized)
    return quantized


@contextlib.contextmanager
def _quiet_loggers(*names: str):
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_texts(texts: str | Sequence[str]) -> list[str]:
    """Return `texts` as a list of strings, or raise a TypeError that names the first bad item's position."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a string or a sequence of strings, got {type(texts).__name__}")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{position}] is {type(text).__name__} ({text!r:.60}), expected str")
    return list(texts)


def count_truncated(model: SentenceTransformer, texts: list[str], prompt: str = "") -> tuple[int, int, int]:
    """How many texts (with their prompt) exceed `model.max_seq_length` tokens: (count, first index, longest)."""
    # verbose=False: no "indexing errors" warning for the texts that are about to be truncated on purpose
    encoded = model.tokenizer([prompt + text for text in texts], truncation=False, verbose=False)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > model.max_seq_length]
    return len(over), (over[0] if over else -1), max(lengths, default=0)


def encode(
    model: SentenceTransformer,
    texts: str | Sequence[str],
    *,
    prompt_name: str | None = None,
    prompt: str | None = None,
    batch_size: int = 32,
    convert_to_tensor: bool = False,
    show_progress_bar: bool | None = None,
    precision: str = "float32",
    calibration: CalibrationRanges | None = None,
) -> np.ndarray | torch.Tensor:
    """Embed `texts` (float32, L2-normalised by the model's Normalize module); one row per text.

    An empty list gives a `(0, dim)` result. Texts longer than `model.max_seq_length` tokens (prompt included)
    are truncated, with one warning per call that says how many. With `model.truncate_dim` set (`load_encoder`)
    rows keep that many dimensions, renormalised. `precision` float16, int8, uint8, binary or ubinary returns
    sentence-transformers' `quantize_embeddings` codes (int8/uint8 with the corpus's `calibration` ranges,
    `compact.load_calibration`; check they are this model's with `CalibrationRanges.check`).
    """
    single = isinstance(texts, str)
    texts = check_texts(texts)
    compaction = Compaction(getattr(model, "truncate_dim", None), precision, calibration)
    width = embedding_width(model)
    compaction.check(width, calibration.model if calibration is not None else None)
    if convert_to_tensor and precision != "float32":
        raise CompactError(f"precision={precision!r} returns numpy codes; leave convert_to_tensor off")
    if not texts:
        empty = compaction.apply(np.zeros((0, width), dtype=np.float32))
        return torch.from_numpy(empty) if convert_to_tensor else empty
    if prompt is None and prompt_name is not None:
        if prompt_name not in model.prompts:
            raise PromptNameError(f"prompt_name={prompt_name!r} is not one of the model's prompts {sorted(model.prompts)}")
        prompt = model.prompts[prompt_name]
    truncated, first, longest = count_truncated(model, texts, prompt or "")
    if truncated:
        logger.warning(
            "%d of %d texts are longer than max_seq_length=%d tokens and were truncated (first: texts[%d]; "
            "longest: %d tokens). Raise model.max_seq_length to embed them whole.",
            truncated, len(texts), model.max_seq_length, first, longest,
        )
    if show_progress_bar is None:
        show_progress_bar = len(texts) >= PROGRESS_BAR_MIN_TEXTS
    embeddings = model.encode(
        texts,
        prompt=prompt,
        batch_size=batch_size,
        convert_to_tensor=convert_to_tensor,
        convert_to_numpy=not convert_to_tensor,
        show_progress_bar=show_progress_bar,
    )
    if convert_to_tensor:
        embeddings = torch.from_numpy(compaction.apply(embeddings.float().cpu().numpy()))
    else:
        embeddings = compaction.apply(embeddings)
    return embeddings[0] if single else embeddings
