"""FP8 inference (extra `[fp8]`, torchao): dynamic per-row FP8 (e4m3) activations and weights in every linear
layer, on GPUs with FP8 tensor cores; embeddings and norms stay bfloat16, pooling and normalisation float32.

`check_fp8_support` says every reason FP8 cannot run here before anything is loaded; `quantize_fp8` swaps the
linear layers' weights in place (`encoding.load_encoder(..., quantize="fp8")` calls both).
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .errors import QuantizationUnavailable

logger = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper / Blackwell: the first GPUs with FP8 tensor cores
FP8_MIN_TORCH = (2, 5)  # torch._scaled_mm with per-row scales
FP8_MIN_TORCHAO = (0, 13)
FP8_MIN_SENTENCE_TRANSFORMERS = (6, 0)
FP8_EXTRA = "pip install 'diffembed-hf[fp8]'"


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
        with quiet_loggers("torchao", "torch.utils._pytree"):  # import-time notes about unrelated extensions
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
    with quiet_loggers("torchao", "torch.utils._pytree"):  # import-time notes about unrelated extensions
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
def quiet_loggers(*names: str):
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
