"""The peak memory of a run, known before any weight is loaded: arithmetic from the model's config.json.

A GPU lent for minutes must not be spent discovering that a setting runs out of memory, and a CPU run should not
swap for an hour before failing. Every figure here is a count of tensor bytes from the config's shapes:

* weights: the parameters (counted as transformers builds them: embeddings, per layer q/k/v/o with their biases,
  SwiGLU, two RMSNorms, the final norm) at the dtype the run loads them in (bf16 on CUDA, fp32 elsewhere);
* training: the trainable parameters' gradients and AdamW's two moments (LoRA adapters are kept in fp32 by PEFT;
  full fine-tuning trains every weight at its own dtype), the activations the backward pass keeps for the texts
  of one optimizer step (only for the layers that train: the backward stops at the lowest LoRA layer), with
  gradient checkpointing only each trained layer's input plus one layer recomputed, and the working set of one
  layer's forward and backward; a LoRA run that merges its adapter loads a second copy of the base at the end;
* inference (encode, evaluate): the weights, one layer's working set at the token budget
  (`--max-tokens-per-batch`: the MLP's three intermediate tensors and the residual stream), the final norm and
  the float32 pooling;
* the packed-attention workspace: the per-token softmax statistics (float32 per head) and the concatenated
  output of the per-text attention calls (the backward's dq/dk/dv in training).

The figures are compared with measured peaks in `benchmarks/memory_estimate.py` (CPU peak RSS, SmolLM2-135M) and
with the GPU peaks recorded on 2026-11-25 (docs). What they leave out: the framework's own memory (CUDA context,
Python and torch libraries), the data set and tokenizer, the vectors an encoding keeps (rows x dimension x 4).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import MemoryLimitError, ModelFilesError, UsageError

if TYPE_CHECKING:
    from .model_folder import ModelFolder

logger = logging.getLogger(__name__)

GiB = 2**30
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAM_MOMENTS = 2  # AdamW keeps exp_avg and exp_avg_sq per trainable value, in the parameter's dtype
LORA_PARAM_BYTES = 4  # PEFT keeps the adapters in float32 whatever the base's dtype (autocast_adapter_dtype)
# A setting "fits" when the estimate is at most this share of the memory; above it the table says "tight".
TIGHT_SHARE = 0.9


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Qwen2/Llama-shaped DiffEmbed backbone that decide its memory, from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    attention_bias: bool = True
    attention_output_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int | None = None

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a config dict (config.json) or a config object; missing sizes are an error naming them."""
        get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
        missing = [key for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads") if not isinstance(get(key), int)]
        if missing:
            raise ModelFilesError(f"config.json lacks the sizes {', '.join(missing)}: no memory estimate without them")
        heads = get("num_attention_heads")
        return cls(vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
                   intermediate_size=get("intermediate_size"), num_hidden_layers=get("num_hidden_layers"),
                   num_attention_heads=heads, num_key_value_heads=get("num_key_value_heads") or heads,
                   head_dim=get("head_dim") or get("hidden_size") // heads,
                   attention_bias=bool(get("attention_bias", True)),
                   attention_output_bias=bool(get("attention_output_bias", False)),
                   mlp_bias=bool(get("mlp_bias", False)), max_position_embeddings=get("max_position_embeddings"))

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int, bool]]:
        """Each linear layer of one decoder layer: (in features, out features, has a bias)."""
        hidden, inter = self.hidden_size, self.intermediate_size
        return {"q_proj": (hidden, self.q_size, self.attention_bias),
                "k_proj": (hidden, self.kv_size, self.attention_bias),
                "v_proj": (hidden, self.kv_size, self.attention_bias),
                "o_proj": (self.q_size, hidden, self.attention_output_bias),
                "gate_proj": (hidden, inter, self.mlp_bias), "up_proj": (hidden, inter, self.mlp_bias),
                "down_proj": (inter, hidden, self.mlp_bias)}

    def layer_parameters(self) -> int:
        linear = sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out, bias in self.linear_shapes().values())
        return linear + 2 * self.hidden_size  # two RMSNorm weights

    def parameters(self) -> int:
        """Every parameter: embeddings, the layers, the final norm (an embedder has no output head)."""
        return self.vocab_size * self.hidden_size + self.num_hidden_layers * self.layer_parameters() + self.hidden_size

    def lora_parameters(self, r: int, targets=LORA_TARGETS, layers: int | None = None) -> int:
        """LoRA's A (r x in) and B (out x r) on each target of the last `layers` layers (None: every layer)."""
        shapes = self.linear_shapes()
        unknown = sorted(set(targets) - set(shapes))
        if unknown:
            raise UsageError(f"LoRA target modules {unknown} are not linear layers of this model; known: "
                             f"{sorted(shapes)}")
        per_layer = sum(r * (shapes[name][0] + shapes[name][1]) for name in targets)
        return per_layer * self.trained_layers(layers)

    def trained_layers(self, layers: int | None) -> int:
        return self.num_hidden_layers if layers is None else min(layers, self.num_hidden_layers)

    def activation_layer_bytes(self, lora: bool, dtype_bytes: int, residual_bytes: int | None = None) -> int:
        """Bytes per token and layer that a backward pass keeps without checkpointing (counted with autograd's
        saved-tensor hooks on a small model, tests/test_memory_estimate.py). Full fine-tuning: each RMSNorm's input
        and normalised value, in float32 whatever the dtype, and its output in the residual stream's dtype (fp32
        under autocast over fp32 weights); q, the attention output and o's input (3 q-sized), k and v, the MLP's
        gate, activation, up and their product (4 MLP-sized), in the compute dtype. LoRA adds the dropout output
        PEFT keeps for each adapted projection's input: q/k/v/gate/up (5 hidden-sized, the residual's dtype), o
        (q-sized) and down (MLP-sized)."""
        hidden, inter = self.hidden_size, self.intermediate_size
        residual = residual_bytes or dtype_bytes
        norms = 4 * hidden * 4 + 2 * hidden * residual
        compute = (3 * self.q_size + 2 * self.kv_size + 4 * inter) * dtype_bytes
        adapters = 5 * hidden * residual + (self.q_size + inter) * dtype_bytes if lora else 0
        return norms + compute + adapters

    def layer_working_values(self) -> int:
        """Values per token alive at once inside one layer's forward when nothing is kept for a backward pass:
        the MLP's gate activation, up and their product (3 MLP-sized) beside the residual stream, the layer's input
        and the norm's output (3 hidden-sized)."""
        return 3 * self.intermediate_size + 3 * self.hidden_size


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, *, layers: int | None = None,
                     lora: bool = True, residual_bytes: int | None = None) -> int:
    """Activations a backward pass keeps for `tokens` tokens over the `layers` layers that train (None: all),
    without gradient checkpointing; `residual_bytes` 4 for autocast over fp32 weights. `device_settings` decides
    checkpointing from this."""
    return tokens * shape.trained_layers(layers) * shape.activation_layer_bytes(lora, dtype_bytes, residual_bytes)


@dataclass
class Component:
    name: str
    bytes: int
    note: str = ""


@dataclass
class MemoryEstimate:
    """The parts of a run's peak; `total` is their sum, or the larger `after` phase (a LoRA merge)."""

    what: str  # "training", "encoding", "evaluation"
    device: str
    dtype: str
    components: list[Component]
    after: Component | None = None  # a later phase whose peak replaces the step's (the merge of a LoRA adapter)
    # the settings to change, most effective first, each with what it would bring the total to
    remedies: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # how automatic settings were counted, the other choice's peak

    @property
    def step(self) -> int:
        return sum(c.bytes for c in self.components)

    @property
    def total(self) -> int:
        return max(self.step, self.after.bytes if self.after else 0)

    def fits(self, memory: int) -> bool:
        return self.total <= memory

    def table(self, memory: int | None = None, memory_source: str = "") -> str:
        """A short table: each component, the total, and whether it fits `memory` (and what to change if not)."""
        rows = [(c.name, c.bytes, c.note) for c in self.components]
        if self.after is not None:
            rows.append(("total of the step", self.step, ""))
            rows.append((self.after.name, self.after.bytes, self.after.note))
        rows.append(("peak", self.total, ""))
        width = max(len(name) for name, _, _ in rows)
        lines = [f"Estimated peak memory of {self.what} on {self.device} ({self.dtype}), before loading any weight:"]
        for name, size, note in rows:
            lines.append(f"  {name:<{width}}  {format_bytes(size):>10}" + (f"  {note}" if note else ""))
        lines += [f"  {note}" for note in self.notes]
        if memory is None:
            lines.append(f"  memory of the device unknown{memory_source and f' ({memory_source})'}: give "
                         "--device-memory (e.g. 80GiB) to check it")
            return "\n".join(lines)
        share = self.total / memory
        verdict = ("fits" if share <= TIGHT_SHARE else "tight (within 10% of the memory)" if share <= 1
                   else "does NOT fit")
        lines.append(f"  {verdict}: {format_bytes(self.total)} of {format_bytes(memory)} ({memory_source}), "
                     f"{share:.0%}")
        if share > TIGHT_SHARE:
            lines.append("  to lower it: " + "; ".join(f"{setting} ({format_bytes(size)})"
                                                       for setting, size in self.remedies) if self.remedies
                         else "  no setting of this command lowers it: a device with more memory is needed")
        return "\n".join(lines)


def format_bytes(size: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{int(size)} B"


def training_estimate(shape: ModelShape, *, batch_size: int, texts_per_row: int, max_seq_length: int,
                      lora: bool = True, lora_r: int = 16, lora_targets=LORA_TARGETS, lora_layers: int | None = None,
                      gradient_checkpointing: bool = False, bf16: bool = False, device: str = "cpu",
                      gradcache: int | None = None, adapter_only: bool = False, world_size: int = 1,
                      remedies: bool = True) -> MemoryEstimate:
    """The peak of one training step (per device), and of the LoRA merge that ends a run.

    Weights load in bf16 on CUDA and in fp32 elsewhere (`load_encoder`); on a CPU `bf16` is autocast over fp32
    weights, so the weights stay fp32 and the activations are bf16. Inputs are counted at `max_seq_length`
    tokens each (the worst batch); each text column is its own forward pass (sentence-transformers' losses), so
    one layer's working set is for `batch_size` texts (GradCache: its mini-batch)."""
    cuda = device.startswith("cuda")
    weight_bytes = 2 if cuda else 4
    act_bytes = 2 if bf16 or cuda else 4
    residual_bytes = weight_bytes if bf16 and not cuda else act_bytes  # autocast keeps the residual stream fp32
    params = shape.parameters()
    texts = batch_size * texts_per_row
    forward_texts = min(batch_size, gradcache) if gradcache else batch_size
    tokens, forward_tokens = texts * max_seq_length, forward_texts * max_seq_length
    layers = shape.trained_layers(lora_layers if lora else None)
    components = [Component("weights", params * weight_bytes, f"{params / 1e6:,.1f}M parameters x {weight_bytes} B")]
    if lora:
        trainable = shape.lora_parameters(lora_r, lora_targets, lora_layers)
        state_bytes = LORA_PARAM_BYTES
        components.append(Component("LoRA adapters", trainable * state_bytes,
                                    f"{trainable / 1e6:,.2f}M values, r={lora_r}, {layers} layers"))
    else:
        trainable, state_bytes = params, weight_bytes
    components.append(Component("gradients", trainable * state_bytes))
    components.append(Component("AdamW state", ADAM_MOMENTS * trainable * state_bytes, "two moments"))
    per_layer = shape.activation_layer_bytes(lora, act_bytes, residual_bytes)
    kept_tokens = forward_tokens if gradcache else tokens  # GradCache: one mini-batch's graph at a time
    if gradient_checkpointing:
        kept = kept_tokens * layers * shape.hidden_size * residual_bytes + forward_tokens * per_layer
        note = f"checkpointed: {layers} layer inputs of {kept_tokens:,} tokens + one layer recomputed"
    else:
        kept = kept_tokens * layers * per_layer
        note = f"{kept_tokens:,} tokens x {layers} layers"
    components.append(Component("activations", kept, note))
    components.append(Component("layer working set", forward_tokens * shape.layer_working_values() * act_bytes,
                                f"one forward of {forward_tokens:,} tokens"))
    workspace = forward_tokens * (shape.num_attention_heads * 4 + (shape.q_size + 2 * shape.kv_size) * act_bytes)
    components.append(Component("packed-attention workspace", workspace, "softmax statistics, dq/dk/dv"))
    if not lora and not cuda and bf16:  # autocast's bf16 copies of trainable weights are cached for the step
        components.append(Component("autocast weight copies", params * 2, "bf16 casts of the trained weights"))
    after = None
    if lora and not adapter_only:
        after = Component("merging the adapter", 2 * params * weight_bytes + trainable * state_bytes * 4,
                          "a fresh copy of the base beside the trained one, after training")
    estimate = MemoryEstimate("training", device + (f" (one of {world_size} ranks)" if world_size > 1 else ""),
                              "bf16" if cuda else ("fp32 weights, bf16 autocast" if bf16 else "fp32"),
                              components, after)
    if remedies:
        estimate.remedies = _training_remedies(shape, estimate, dict(
            batch_size=batch_size, texts_per_row=texts_per_row, max_seq_length=max_seq_length, lora=lora,
            lora_r=lora_r, lora_targets=lora_targets, lora_layers=lora_layers,
            gradient_checkpointing=gradient_checkpointing, bf16=bf16, device=device, gradcache=gradcache,
            adapter_only=adapter_only))
    return estimate


def _training_remedies(shape: ModelShape, estimate: MemoryEstimate, settings: dict) -> list[tuple[str, int]]:
    """Each single setting that lowers the peak, with the peak it gives, lowest first."""
    options = []
    if not settings["gradient_checkpointing"]:
        options.append(("--gradient-checkpointing", {"gradient_checkpointing": True}))
    if not settings["lora"]:
        options.append(("LoRA (drop --full)", {"lora": True}))
    if settings["batch_size"] > 1:
        half = settings["batch_size"] // 2
        options.append((f"--batch-size {half}", {"batch_size": half}))
        if not settings["gradcache"]:
            options.append((f"--gradcache 1 (GradCache: batch {settings['batch_size']} at the memory of 1)",
                            {"gradcache": 1}))
    if settings["max_seq_length"] > 64:
        half = settings["max_seq_length"] // 2
        options.append((f"--max-seq-length {half}", {"max_seq_length": half}))
    if settings["lora"] and settings["lora_layers"] is None and shape.num_hidden_layers > 1:
        third = max(1, math.ceil(shape.num_hidden_layers / 3))
        options.append((f"--lora-layers {third}", {"lora_layers": third}))
    if settings["lora"] and not settings["adapter_only"] and estimate.after and estimate.after.bytes > estimate.step:
        options.append(("--adapter-only (no merge at the end)", {"adapter_only": True}))
    found = []
    for label, change in options:
        total = training_estimate(shape, **{**settings, **change}, remedies=False).total
        if total < estimate.total:
            found.append((label, total))
    return sorted(found, key=lambda item: item[1])


def inference_estimate(shape: ModelShape, *, max_tokens_per_batch: int, max_seq_length: int | None = None,
                       device: str = "cpu", dtype_bytes: int | None = None, what: str = "encoding") -> MemoryEstimate:
    """The peak of encoding with batches of up to `max_tokens_per_batch` real tokens (packed, no padding): the
    weights, one layer's working set, the final norm and pooling in float32, the attention workspace."""
    cuda = device.startswith("cuda")
    dtype_bytes = dtype_bytes or (2 if cuda else 4)
    params = shape.parameters()
    tokens = max_tokens_per_batch
    hidden = shape.hidden_size
    layer = tokens * shape.layer_working_values() * dtype_bytes
    # the last layer's output and the norm's float32 input, product and result; then pooling's float32 copy
    final = tokens * hidden * (dtype_bytes + 3 * 4)
    components = [Component("weights", params * dtype_bytes, f"{params / 1e6:,.1f}M parameters x {dtype_bytes} B"),
                  Component("activations", max(layer, final), f"one layer at {tokens:,} tokens per batch"),
                  Component("packed-attention workspace",
                            tokens * (shape.num_attention_heads * 4 + shape.q_size * dtype_bytes),
                            "softmax statistics, the per-text outputs joined")]
    estimate = MemoryEstimate(what, device, "bf16" if dtype_bytes == 2 else "fp32", components)
    found = []
    for factor in (2, 4):
        smaller = tokens // factor
        if smaller >= (max_seq_length or 1) and smaller >= 1:
            total = inference_estimate(shape, max_tokens_per_batch=smaller, device=device, dtype_bytes=dtype_bytes,
                                       what=what).total
            if total < estimate.total:
                found.append((f"--max-tokens-per-batch {smaller}", total))
    estimate.remedies = found[:1]
    return estimate


# ----------------------------------------------------------------------------------------------------------
# What the run will see: the model's config, the device's memory
# ----------------------------------------------------------------------------------------------------------


def read_model_config(model_name_or_path: str | ModelFolder) -> dict:
    """config.json of a DiffEmbed folder (an adapter folder: its base's), or of a Hub id (downloaded alone, or from
    the cache offline), without touching any weight file. A folder a job has opened gives the config it read."""
    from .model_folder import ADAPTER_CONFIG, CONFIG, ModelFolder, adapter_base, local_folder, read_json

    if isinstance(model_name_or_path, ModelFolder):
        opened = model_name_or_path
        return opened.config if opened.kind == "model" else read_model_config(opened.base[0])
    folder = local_folder(model_name_or_path)
    if folder is not None:
        if not (folder / CONFIG).is_file() and (folder / ADAPTER_CONFIG).is_file():
            base, _ = adapter_base(folder)
            return read_model_config(base)
        if not (folder / CONFIG).is_file():
            raise ModelFilesError(f"{folder} has no {CONFIG}: nothing to estimate from")
        config = read_json(folder / CONFIG, ModelFilesError)
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(model_name_or_path, CONFIG)
        except Exception as err:  # noqa: BLE001 - offline, missing repo, network: one line
            raise UsageError(f"cannot read {CONFIG} of {model_name_or_path}: {' '.join(str(err).split())}") from None
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ModelFilesError(f"{model_name_or_path}: {CONFIG} is not a JSON object")
    return config


def resolve_device(device: str | None) -> str:
    """The device a run will use: the one given, else CUDA where available (as `load_encoder` chooses)."""
    if device is not None:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def available_memory() -> int | None:
    """Free host memory in bytes (MemAvailable), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_memory(device: str, given: int | None = None) -> tuple[int | None, str]:
    """(bytes the run may use, where that figure comes from): `given` (--device-memory), else a CUDA device's free
    memory, else the host's available memory (MemAvailable)."""
    if given is not None:
        return given, "--device-memory"
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index
        free, total = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
        return free, f"free on {device}, of {format_bytes(total)}"
    available = available_memory()
    return available, "available host memory" if available is not None else "host memory unreadable"


def check_training_fits(estimate: MemoryEstimate, memory: int | None, source: str, *, when: str) -> None:
    """Refuse a run whose estimate exceeds the memory, naming the settings that would bring it under."""
    if memory is None or estimate.fits(memory):
        if memory is not None:
            logger.debug("Memory check (%s): a training peak of about %s, %s available (%s).", when,
                        format_bytes(estimate.total), format_bytes(memory), source)
        return
    fitting = [f"{label} (about {format_bytes(size)})" for label, size in estimate.remedies if size <= memory]
    if fitting:
        advice = "change " + " or ".join(fitting)
    else:
        lower = [f"{label} (about {format_bytes(size)})" for label, size in estimate.remedies[:3]]
        advice = ("no single setting brings it under; each of these lowers it: " + ", ".join(lower) + "; or use a "
                  "device with more memory") if lower else "use a device with more memory"
    raise MemoryLimitError(
        f"training would need about {format_bytes(estimate.total)} at its peak, more than the "
        f"{format_bytes(memory)} {source} ({when}; `diffembed train --estimate` shows the parts): {advice}")
