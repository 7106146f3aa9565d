"""Training settings that fit the device: the study's recipe on a GPU, settings that make progress in minutes on a CPU.

The study's recipe is a GPU recipe: 4,096-token inputs, gradient checkpointing, bf16. On a CPU each of these
works against the user: every text is cut at 4,096 tokens although the data is far shorter (padding is free of
cost only where there is none: a batch is as long as its longest text), gradient checkpointing recomputes the
whole forward pass (a third more work) to save memory that a CPU host rarely lacks for a small model, and the
thread count decides whether two cores are used at all. Two more levers decide how much a CPU minute buys (measured on
SmolLM2-135M: docs/benchmarks.md, "The CPU recipe"; the reasons: docs/design/recipe.md): bf16 autocast where AMX
multiplies bf16 in hardware, and LoRA on the last third of the layers, so that the backward pass stops there.
`resolve_device_settings` fills every setting the user left to "auto" (None) once, from the device, the model and
the training texts, and says what it chose and why. Settings the user gave are kept as given.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import torch

from .memory_estimate import (MemoryEstimate, ModelShape, activation_bytes, available_memory, format_bytes,
                              training_estimate)
from .validation import MAX_SEQ_LENGTH

logger = logging.getLogger(__name__)

LENGTH_QUANTILE = 0.98  # on a CPU, inputs are cut at this quantile of the training texts' token lengths
LENGTH_STEP = 32  # ... rounded up to a multiple of this
# On a CPU, LoRA trains the last third of the layers unless told otherwise (measured on SmolLM2-135M, 30 layers: a
# step on the last 10 took 2.7x less time than on all 30; with bf16 autocast it scored 0.612 nDCG@10 on the held-out
# reasoning set in 10 minutes against 0.580 for every layer in fp32; benchmarks/quality.py, docs/benchmarks.md, "The
# CPU recipe")
CPU_LORA_SHARE = 1 / 3
CPU_LORA_SPEEDUP = "2.7x"
MEMORY_SHARE = 0.5  # gradient checkpointing goes on where the activations would need more of the free memory


@dataclass
class DeviceSettings:
    """What `train` runs with; `reasons` says, per setting, why (for the log line and the training record)."""

    device: str
    max_seq_length: int
    gradient_checkpointing: bool
    bf16: bool
    threads: int | None  # torch's intra-op threads on a CPU (None on a GPU)
    lora_layers: int | None = None  # LoRA on the last N layers only (None: every layer)
    reasons: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        parts = [f"max_seq_length {self.max_seq_length} ({self.reasons['max_seq_length']})",
                 f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'} "
                 f"({self.reasons['gradient_checkpointing']})",
                 f"{'bf16' if self.bf16 else 'fp32'} ({self.reasons['bf16']})"]
        if "lora_layers" in self.reasons:
            layers = "every layer" if self.lora_layers is None else f"the last {self.lora_layers} layers"
            parts.append(f"LoRA on {layers} ({self.reasons['lora_layers']})")
        if self.threads is not None:
            parts.append(f"{self.threads} threads ({self.reasons['threads']})")
        return f"Training on {self.device}: " + "; ".join(parts)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container or taskset may allow fewer than exist)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def token_length_quantile(tokenizer, texts: list[str], quantile: float = LENGTH_QUANTILE) -> tuple[int, int]:
    """(the `quantile` of the texts' token lengths, the longest), special tokens included."""
    lengths = sorted(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])
    index = min(len(lengths) - 1, math.ceil(quantile * len(lengths)) - 1)
    return lengths[index], lengths[-1]


def cpu_has_amx() -> bool:
    """AMX tiles (Intel Sapphire Rapids and later): bf16 matrix products in hardware, several times fp32's rate."""
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_has_bf16() -> bool:
    """Native bf16 dot products (AVX512-BF16 or AMX) in oneDNN; elsewhere bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_device_settings(config, device: torch.device, model_config, tokenizer, texts: list[str],
                            texts_per_step: int, model_limit: int | None) -> DeviceSettings:
    """Fill `config`'s automatic settings (None) for `device`. `texts` are the training inputs as the model sees
    them (queries with their prompt, documents); `texts_per_step` how many of them one optimizer step encodes."""
    reasons = {}
    on_cuda = device.type == "cuda"
    limit = min(model_limit or MAX_SEQ_LENGTH, MAX_SEQ_LENGTH)

    if config.max_seq_length is not None:
        length, reasons["max_seq_length"] = config.max_seq_length, "as set"
    elif on_cuda:
        length, reasons["max_seq_length"] = limit, "the recipe's"
    else:
        typical, longest = token_length_quantile(tokenizer, texts)
        length = min(limit, max(LENGTH_STEP, math.ceil(typical / LENGTH_STEP) * LENGTH_STEP))
        cut = sum(1 for n in (len(ids) for ids in tokenizer(texts)["input_ids"]) if n > length) / max(1, len(texts))
        reasons["max_seq_length"] = (f"the training texts' {LENGTH_QUANTILE:.0%} length, {cut:.1%} of them cut "
                                     f"(longest {longest}); the recipe's {MAX_SEQ_LENGTH} is a GPU setting")

    if config.bf16 is not None:
        bf16, reasons["bf16"] = config.bf16, "as set"
    elif on_cuda:
        bf16, reasons["bf16"] = True, "the recipe's"
    elif cpu_has_amx():
        # Measured on SmolLM2-135M (benchmarks/quality.py, 2 cores of an AMX Xeon): bf16 autocast over fp32 weights
        # trained 1.57x faster than fp32, its first loss within 0.4% of fp32's.
        bf16, reasons["bf16"] = True, ("this CPU has AMX: bf16 autocast over fp32 weights, about 1.6x fp32's speed "
                                       "at nearly its losses")
    else:
        bf16 = False
        # Measured on SmolLM2-135M with native AVX512-BF16 but no AMX (benchmarks/train_throughput_cpu.py, idle
        # cores): a frozen base held in bf16 trained 1.29x faster than fp32, but its losses were 13% higher by step 4.
        reasons["bf16"] = ("this CPU has native bf16 but no AMX, and a bf16 base moved a small model's losses well "
                           "off the fp32 ones; --bf16 trades that for about 1.3x speed" if cpu_has_bf16()
                           else "this CPU has no native bf16")

    lora_layers = config.lora_layers
    if config.lora_layers is not None:
        reasons["lora_layers"] = "as set"
    elif config.lora and not on_cuda:
        layers = model_config.num_hidden_layers
        lora_layers = max(1, math.ceil(layers * CPU_LORA_SHARE))
        if lora_layers < layers:
            reasons["lora_layers"] = (f"a CPU: the backward pass stops {lora_layers} of {layers} layers down, a step "
                                      f"takes about {CPU_LORA_SPEEDUP} less time and more steps fit the minutes; "
                                      "--lora-layers N sets it")
        else:
            lora_layers = None

    if config.gradient_checkpointing is not None:
        checkpointing, reasons["gradient_checkpointing"] = config.gradient_checkpointing, "as set"
    elif on_cuda:
        checkpointing, reasons["gradient_checkpointing"] = True, "the recipe's"
    else:
        need = activation_bytes(ModelShape.from_config(model_config), texts_per_step * length, 2 if bf16 else 4,
                                layers=lora_layers if config.lora else None, lora=config.lora,
                                residual_bytes=4)  # CPU weights are fp32: so is the residual stream
        free = available_memory()
        checkpointing = free is not None and need > MEMORY_SHARE * free
        if checkpointing:
            reasons["gradient_checkpointing"] = (f"activations of about {need / 2**30:.1f} GiB would take more than "
                                                 f"half of the {free / 2**30:.1f} GiB free")
        else:
            free_text = f"{free / 2**30:.1f} GiB free" if free is not None else "free memory unknown"
            reasons["gradient_checkpointing"] = (f"activations of about {need / 2**30:.1f} GiB fit ({free_text}); "
                                                 "recomputing the forward would cost a third more time")

    threads = None
    if not on_cuda:
        threads = available_cores()
        reasons["threads"] = f"the cores this process may use (torch had {torch.get_num_threads()})"
    return DeviceSettings(device=str(device), max_seq_length=length, gradient_checkpointing=checkpointing, bf16=bf16,
                          threads=threads, lora_layers=lora_layers, reasons=reasons)


def apply_threads(settings: DeviceSettings) -> None:
    """Set torch's intra-op threads to the chosen count (CPU only)."""
    if settings.threads is not None and torch.get_num_threads() != settings.threads:
        torch.set_num_threads(settings.threads)


def plan_training(shape: ModelShape, config, *, texts_per_row: int, device: str, world_size: int = 1,
                  memory: int | None = None, favourable: bool = False) -> MemoryEstimate:
    """The training estimate for a `TrainingConfig`, its automatic settings (None) counted as `resolve_device_settings`
    will choose them: on CUDA the recipe's (4096 tokens, checkpointing, bf16); on a CPU LoRA on the last third of
    the layers, bf16 autocast with AMX, and checkpointing where the activations would take more than half of
    `memory`. A CPU's automatic length comes from the training texts' tokens, unknown before the tokenizer runs:
    counted at the model's limit (at most 4096), or with `favourable` (the check before loading, which must never
    refuse a run that fits) at the shortest length it can choose, with checkpointing on."""
    cuda = device.startswith("cuda")
    notes = []
    limit = min(shape.max_position_embeddings or MAX_SEQ_LENGTH, MAX_SEQ_LENGTH)
    length = config.max_seq_length
    if length is None:
        if cuda:
            length = limit
        elif favourable:
            length = LENGTH_STEP
        else:
            length = limit
            notes.append(f"max_seq_length: automatic on a CPU (the training texts' 98% token length, at most "
                         f"{limit}); counted at {limit}: give --max-seq-length for the run's own figure")
    bf16 = config.bf16 if config.bf16 is not None else (cuda or cpu_has_amx())
    lora_layers = config.lora_layers
    if lora_layers is None and config.lora and not cuda:
        lora_layers = max(1, math.ceil(shape.num_hidden_layers * CPU_LORA_SHARE))
    common = dict(batch_size=config.batch_size, texts_per_row=texts_per_row, max_seq_length=length,
                  lora=config.lora, lora_r=config.lora_r, lora_targets=config.lora_target_modules,
                  lora_layers=lora_layers, bf16=bf16, device=device, gradcache=config.gradcache_mini_batch_size,
                  adapter_only=config.adapter_only, world_size=world_size)
    checkpointing = config.gradient_checkpointing
    if checkpointing is None:
        if cuda or favourable:
            checkpointing = True
        else:  # resolve_device_settings' rule
            need = activation_bytes(shape, config.batch_size * texts_per_row * length, 2 if bf16 else 4,
                                    layers=lora_layers if config.lora else None, lora=config.lora, residual_bytes=4)
            checkpointing = memory is not None and need > MEMORY_SHARE * memory
    estimate = training_estimate(shape, **common, gradient_checkpointing=checkpointing)
    other = training_estimate(shape, **common, gradient_checkpointing=not checkpointing, remedies=False)
    activations = {c.name: c.bytes for c in other.components}["activations"]
    estimate.notes.append(f"{'without' if checkpointing else 'with'} gradient checkpointing: activations "
                          f"{format_bytes(activations)}, peak {format_bytes(other.total)}")
    estimate.notes[:0] = notes
    return estimate
