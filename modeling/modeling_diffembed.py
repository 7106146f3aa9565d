"""DiffEmbed: a diffusion language model (Dream, LLaDA) or a Qwen2/Llama-shaped LLM used as a text embedder.

The backbone is a pre-norm decoder stack (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP,
final RMSNorm) run with **bidirectional** attention, as in the DiffEmbed study (arXiv 2505.15045). The
embedding is the mean of the final-layer states over the real tokens.

This file is Hub remote code: it is copied verbatim into every checkpoint beside `configuration_diffembed.py` and
`attention_kernels.py` (which varlen kernel runs here, tested once against SDPA) and imports only `torch`,
`transformers` and those two files.

Token layouts. Every layer works on one of two layouts, chosen once per forward:
  * padded  `[batch, seq, hidden]` with a key-padding mask (the `eager` and `sdpa` reference paths);
  * packed  `[total_tokens, hidden]` with `cu_seqlens` (every automatic path): the batch is unpadded once
    before the first layer and re-padded once after the last, so no layer ever computes a padded token.
Positions always count real tokens only, so left padding, right padding, packing and a text embedded
alone all give the same embedding.

No host sync on the hot path. A forward never waits for the device to answer a question on the host: the
token-id range is checked where the ids are still on the host (CPU input here; the package's packed encoder
before it copies a batch to the device), non-finite embeddings by an eager forward on a CPU (host memory, no
stream) and on an accelerator on the host copy the encoder makes, and the varlen kernels' self-test runs at load
time and after every `.to()`, not in a forward. Both host checks come back on an accelerator with
`model.set_debug_checks(True)` or `DIFFEMBED_DEBUG_CHECKS=1`. Under `torch.compile` the forward is one graph
(`fullgraph=True`) for packed and padded input alike.
"""

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import ModelOutput, logging

from .attention_kernels import (
    MASKED_PACKED,
    PACKED_BACKENDS,
    VARLEN_KERNELS,
    call_varlen_kernel,
    flash_attn_2_available,
    log_backend_once,
    probe_kernel,
    select_backend,
)
from .configuration_diffembed import DiffEmbedConfig

logger = logging.get_logger(__name__)

# What users may pass as `attn_implementation`. `None` means: choose the fastest correct path at run time.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")

# Host checks of device data (token-id range on an accelerator, non-finite embeddings) block the stream once per
# call: off unless asked for, per model (`set_debug_checks`) or for the process (this variable).
_DEBUG_CHECKS = os.environ.get("DIFFEMBED_DEBUG_CHECKS", "").strip().lower() not in ("", "0", "false", "no")


# ----------------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, groups: int, dim: int) -> torch.Tensor:
    """Repeat each kv head `groups` times along `dim` (grouped-query attention for kernels without GQA)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)


def eager_attention(q, k, v, mask, scale, causal):
    """Reference attention on `[batch, heads, seq, head_dim]`. `mask`: bool, True = may attend, or None."""
    k = repeat_kv(k, q.shape[1] // k.shape[1], dim=1)
    v = repeat_kv(v, q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if causal:
        length = q.shape[2]
        causal_mask = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        mask = causal_mask if mask is None else mask & causal_mask
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, mask, scale, causal):
    """SDPA on `[batch, heads, seq, head_dim]`; without a mask SDPA may pick its fastest kernel."""
    if causal and mask is not None:
        length = q.shape[2]
        mask = mask & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        causal = False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


@dataclass
class TokenLayout:
    """How a batch's tokens are arranged; built once per forward and shared by every layer.

    padded layout: `key_mask` is `[batch, 1, 1, seq]` (True = real token) or None when nothing is padded.
    packed layout: `cu_seqlens` (int32, on the model's device), `max_seqlen` (host int) and `lengths`
    (host list, only for `packed_sdpa`, which splits the batch per text). `packed_masked_*` instead re-pads
    each layer's q/k/v to `[texts, max_seqlen]` at (`text_index`, `token_position`) of every token and attends
    under `key_mask` (`[texts, 1, 1, max_seqlen]`): no host list, so one compiled graph serves every batch.
    """

    backend: str
    key_mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    lengths: Optional[list] = None
    gqa_mode: Optional[str] = None
    text_index: Optional[torch.Tensor] = None
    token_position: Optional[torch.Tensor] = None

    @property
    def packed(self) -> bool:
        return self.backend in PACKED_BACKENDS


def attention(q, k, v, layout: TokenLayout, scale: float, causal: bool) -> torch.Tensor:
    """Attention over `[..., tokens, heads, head_dim]` in the layout's arrangement; returns the same shape as q."""
    if layout.backend in VARLEN_KERNELS:
        return call_varlen_kernel(
            layout.backend, layout.gqa_mode, q, k, v, layout.cu_seqlens, layout.max_seqlen, scale, causal
        )
    if layout.backend in ("packed_sdpa", "packed_eager"):
        attend = eager_attention if layout.backend == "packed_eager" else sdpa_attention
        outputs = [
            attend(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None], None, scale, causal)
            for qi, ki, vi in zip(*(x.split(layout.lengths) for x in (q, k, v)))
        ]
        return torch.cat([o[0].transpose(0, 1) for o in outputs])
    if layout.backend in MASKED_PACKED:
        attend = eager_attention if layout.backend == "packed_masked_eager" else sdpa_attention
        index = (layout.text_index, layout.token_position)
        shape = (layout.key_mask.shape[0], layout.max_seqlen)
        q, k, v = (x.new_zeros(*shape, *x.shape[1:]).index_put(index, x).transpose(1, 2) for x in (q, k, v))
        return attend(q, k, v, layout.key_mask, scale, causal).transpose(1, 2)[index]
    attend = eager_attention if layout.backend == "eager" else sdpa_attention
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout.key_mask, scale, causal)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------


class DiffEmbedRMSNorm(nn.Module):
    """RMSNorm computed in float32, as Qwen2/Llama do."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor, keep_fp32: bool = False) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if keep_fp32:  # the final norm: pooling and normalisation then see unrounded states
            return self.weight.float() * hidden_states
        return self.weight * hidden_states.to(input_dtype)


class DiffEmbedRotaryEmbedding(nn.Module):
    """Default RoPE: cos/sin of position x inverse frequency, computed in float32."""

    def __init__(self, config: DiffEmbedConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.base = config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (self.base**exponent)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor):
        """`position_ids` of any shape -> (cos, sin) of shape `[*position_ids.shape, head_dim]`, float32."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q, k, cos, sin, fp32: bool):
    """Rotate `[..., tokens, heads, head_dim]` q/k; cos/sin are `[..., tokens, head_dim]` float32.

    Qwen2/Dream rotate in the model dtype (cos/sin cast down); LLaDA rotates in float32 (`rope_fp32`).
    """
    dtype = q.dtype
    if fp32:
        q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    return q.to(dtype), k.to(dtype)


class DiffEmbedAttention(nn.Module):
    """Grouped-query self-attention. Bidirectional unless `config.is_causal`."""

    def __init__(self, config: DiffEmbedConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = config.is_causal
        self.rope_fp32 = config.rope_fp32
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_output_bias)

    def forward(self, hidden_states, cos, sin, layout: TokenLayout) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        q, k = apply_rotary(q, k, cos, sin, self.rope_fp32)
        out = attention(q, k, v, layout, self.scaling, self.is_causal)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1))


class DiffEmbedMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: DiffEmbedConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DiffEmbedDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DiffEmbedConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DiffEmbedAttention(config, layer_idx)
        self.mlp = DiffEmbedMLP(config)
        self.input_layernorm = DiffEmbedRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DiffEmbedRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cos, sin, layout: TokenLayout) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), cos, sin, layout)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DiffEmbedOutput(ModelOutput):
    """
    last_hidden_state: final-layer token states after the last RMSNorm, in the input's layout
        (`[batch, seq, hidden]`, or `[1, total_tokens, hidden]` for packed input). First, so that
        `outputs[0]` is what sentence-transformers' Transformer module reads.
    embeddings: one pooled (and, if configured, L2-normalised) float32 vector per text, `[num_texts, hidden]`.
    """

    last_hidden_state: Optional[torch.Tensor] = None
    embeddings: Optional[torch.Tensor] = None


class DiffEmbedPreTrainedModel(PreTrainedModel):
    config_class = DiffEmbedConfig
    config: DiffEmbedConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiffEmbedDecoderLayer"]
    _supports_sdpa = True
    # flash_attention_2 is dispatched by this file (never through transformers' Hub-kernel fallback).
    _supports_flash_attn = False
    # Accepts packed input (`position_ids`, `cu_seq_lens_q/k`, `max_length_q/k`): sentence-transformers reads this.
    _supports_attention_backend = True

    def _init_weights(self, module):
        # Through `transformers.initialization`, which leaves weights that were loaded from a checkpoint alone.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DiffEmbedRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DiffEmbedRotaryEmbedding):
            # Non-persistent buffer: it starts on the meta device when loading, so it is rebuilt here.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Validate `attn_implementation` here instead of in transformers, which would fall back to downloading
        a Hub kernel when flash-attn is missing. `None` stays `None`: the path is chosen per forward."""
        if attn_implementation is None or attn_implementation in ("eager", "sdpa"):
            return attn_implementation
        if attn_implementation == "flash_attention_2":
            if not flash_attn_2_available():
                raise ImportError(
                    "attn_implementation='flash_attention_2' needs the flash-attn package with "
                    "`flash_attn_varlen_func` (pip install flash-attn), which is not installed or not usable here. "
                    "Leave attn_implementation unset to use torch's own varlen kernel on CUDA."
                )
            return attn_implementation
        if attn_implementation == "vllm":  # vLLM's transformers backend; its native Qwen2/Llama code runs this model
            config = self.config
            arch = "Qwen2Model" if config.attention_bias and not config.attention_output_bias else "LlamaModel"
            raise ValueError(
                "DiffEmbed does not run on vLLM's transformers backend (attn_implementation='vllm'). Serve this folder "
                f"""with vLLM's own {arch}: --trust-remote-code --hf-overrides '{{"architectures": ["{arch}"]}}', """
                "or export it for vLLM with `diffembed export vllm MODEL OUT` (no remote code)."
            )
        raise ValueError(
            f"DiffEmbed does not support attn_implementation={attn_implementation!r}; "
            f"use one of {ATTN_IMPLEMENTATIONS} or leave it unset (automatic choice)."
        )

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # the backend is read from the config at every forward

    @property
    def attention_backend(self) -> str:
        """The attention path a padded batch takes on this model's current device and dtype."""
        param = next(self.parameters())
        return select_backend(self.config, param.device, param.dtype)

    debug_checks: bool = _DEBUG_CHECKS

    def set_debug_checks(self, enabled: bool = True):
        """Check token ids and embeddings on the host in every forward, wherever the tensors live (one device sync
        each): for debugging a pipeline that feeds ids built elsewhere, or a dtype that may overflow."""
        for module in self.modules():
            if isinstance(module, DiffEmbedPreTrainedModel):
                module.debug_checks = enabled
        return self

    def prepare_attention(self):
        """Self-test every varlen kernel that may run on this model's device and dtype (forward and backward
        against SDPA, cached per device, dtype and head shape), so that no forward has to.

        It runs here, called at load (`from_pretrained`) and after every device or dtype change (`.to()`,
        `.cuda()`, `.half()` all pass through `_apply`), because those are the only moments the answer can
        change, and a forward is the wrong place: the test would be timed as the first batch, would run a
        backward inside a caller's `inference_mode`, and cannot be traced by `torch.compile`."""
        param = next(self.parameters(), None)
        if param is not None:
            heads = (self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim,
                     self.config.is_causal)
            for kernel in VARLEN_KERNELS:
                probe_kernel(kernel, param.device, param.dtype, *heads)
        return self

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self.prepare_attention()
        return module

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)  # a (model, loading_info) pair if that was asked for
        (loaded[0] if isinstance(loaded, tuple) else loaded).prepare_attention()
        return loaded


class DiffEmbedModel(DiffEmbedPreTrainedModel):
    """The bidirectional backbone: token embeddings -> decoder layers -> final RMSNorm."""

    def __init__(self, config: DiffEmbedConfig):
        super().__init__(config)
        # No padding_idx: Dream's pad id is <|endoftext|>, a real token whose embedding must stay trainable.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DiffEmbedDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = DiffEmbedRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DiffEmbedRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        **kwargs,
    ) -> BaseModelOutput:
        """Padded input: `input_ids`/`inputs_embeds` `[batch, seq]` with an optional 0/1 `attention_mask`.
        Packed input (sentence-transformers' flattening, sequence packing): `[1, total_tokens]` plus
        `cu_seq_lens_q` (and optionally `max_length_q`, `position_ids` restarting at 0 per text).
        `position_ids` are otherwise derived from the mask so that they count real tokens only."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if len(shape) != 2:
            raise ValueError(f"Expected a [batch, seq] input, got shape {tuple(shape)}.")
        if shape.numel() == 0:  # an empty batch, or texts that tokenized to nothing: nothing to compute
            device = (input_ids if input_ids is not None else inputs_embeds).device
            return BaseModelOutput(last_hidden_state=torch.zeros(*shape, self.config.hidden_size, device=device))
        if input_ids is not None:
            self._check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)

        compiling = torch.compiler.is_compiling()
        cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is not None and (compiling or cu_seqlens.device.type != "cpu"):
            hidden, positions, layout = self._packed_input_on_device(
                inputs_embeds, cu_seqlens, position_ids, kwargs.get("max_length_q")
            )
        elif cu_seqlens is not None:
            hidden, positions, layout = self._packed_input(inputs_embeds, cu_seqlens, position_ids)
        elif compiling:
            hidden, positions, layout = self._padded_input_compiled(inputs_embeds, attention_mask, position_ids)
        else:
            hidden, positions, layout, token_index = self._padded_input(inputs_embeds, attention_mask, position_ids)

        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, layout)
        hidden = self.norm(hidden, keep_fp32=True)

        if cu_seqlens is not None:
            hidden = hidden.unsqueeze(0)
        elif layout.packed:  # re-pad once
            batch, length = shape
            padded = hidden.new_zeros(batch * length, hidden.shape[-1])
            hidden = padded.index_copy_(0, token_index, hidden).view(batch, length, -1)
        return BaseModelOutput(last_hidden_state=hidden)

    def _check_token_ids(self, input_ids: torch.Tensor):
        """Out-of-range ids give a cryptic IndexError on CPU and a fatal device assert on CUDA: name them, without
        a device sync. Ids on the host are read there (free); traced, an asynchronous assert carries the message
        (raised on CPU; on CUDA it is a device assert, like the lookup's own). Ids already on an accelerator are
        not read back: the encoder checked them before the copy and a tokenizer cannot exceed its vocabulary;
        `debug_checks` reads them anyway."""
        vocab_size = self.config.vocab_size
        if torch.compiler.is_compiling():
            in_range = ((input_ids >= 0) & (input_ids < vocab_size)).all()
            torch._assert_async(in_range, f"input_ids must lie in [0, {vocab_size}) (the model's vocab_size); "
                                          "was the text tokenized with a different tokenizer?")
        elif input_ids.device.type == "cpu" or self.debug_checks:
            check_token_ids(input_ids, vocab_size)

    def _padded_input_compiled(self, inputs_embeds, attention_mask, position_ids):
        """A padded batch under torch.compile: the padded path with a key mask, every step a tensor op.

        Unpadding needs the number of real tokens on the host (a sync, and a size the graph would depend on),
        so a compiled padded batch attends over its padding, masked; packed input (`cu_seq_lens_q`, what the
        encoder sends) is the compiled path that computes no padded token. The length limit is checked on the
        width, the one length known without reading the mask."""
        batch, length = inputs_embeds.shape[:2]
        if length > self.config.max_position_embeddings:
            _raise_too_long(length, self.config.max_position_embeddings)
        device = inputs_embeds.device
        backend = "eager" if self.config._attn_implementation == "eager" else "sdpa"
        key_mask = None
        if attention_mask is None:
            if position_ids is None:
                position_ids = torch.arange(length, device=device).expand(batch, length)
        else:
            mask = attention_mask.to(device, torch.bool)
            if position_ids is None:
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            # an empty row attends to its padding instead of nothing (NaN); its output is discarded by pooling
            key_mask = (mask | ~mask.any(-1, keepdim=True))[:, None, None, :]
        return inputs_embeds, position_ids, TokenLayout(backend, key_mask=key_mask)

    def _padded_input(self, inputs_embeds, attention_mask, position_ids):
        """Derive positions and the token layout of a padded batch; unpad it if the backend packs."""
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        backend = select_backend(self.config, device, inputs_embeds.dtype)
        # The mask goes to the host once: lengths, max_seqlen and the unpad index are then known without a
        # device sync inside the model (a no-op when the tokenizer's mask was never moved to the GPU).
        mask = None if attention_mask is None else attention_mask.detach().to("cpu", torch.bool)
        if mask is not None and mask.all():
            mask = None
        empty = None
        if mask is not None:
            lengths = mask.sum(1)
            if not lengths.all():
                empty = lengths.eq(0)
                logger.warning_once(
                    "Some rows of attention_mask have no real token (empty texts): they get a zero embedding."
                )
            if int(lengths.max()) > self.config.max_position_embeddings:
                _raise_too_long(int(lengths.max()), self.config.max_position_embeddings)
        elif length > self.config.max_position_embeddings:
            _raise_too_long(length, self.config.max_position_embeddings)

        if position_ids is None:
            if mask is None:
                position_ids = torch.arange(length, device=device).expand(batch, length)
            else:
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0).to(device)

        if backend in PACKED_BACKENDS and (mask is None or not lengths.any()):
            # Nothing to unpad: one unmasked SDPA call lets torch pick its fastest kernel (cuDNN / flash on
            # CUDA, measured faster than the varlen kernel on long single documents) and beats a per-text loop.
            backend = "sdpa"
        log_backend_once(backend)
        if backend not in PACKED_BACKENDS:
            key_mask = None
            if mask is not None:
                # An empty row would mask every key (NaN); let it attend to its padding, its output is discarded.
                key_mask = mask if empty is None else mask | empty[:, None]
                key_mask = key_mask[:, None, None, :].to(device)
            return inputs_embeds, position_ids, TokenLayout(backend, key_mask=key_mask), None

        if mask is None:
            lengths_list = [length] * batch
            token_index = torch.arange(batch * length, device=device)
        else:
            lengths_list = [n for n in lengths.tolist() if n]
            token_index = mask.flatten().nonzero().flatten().to(device)
        layout = _packed_layout(self.config, backend, lengths_list, device, inputs_embeds.dtype)
        hidden = inputs_embeds.reshape(batch * length, -1).index_select(0, token_index)
        positions = position_ids.reshape(-1).index_select(0, token_index)
        return hidden, positions, layout, token_index

    def _packed_input_on_device(self, inputs_embeds, cu_seqlens, position_ids, max_seqlen):
        """A packed batch whose text boundaries are not read on the host: traced (torch.compile), or
        `cu_seq_lens_q` already on an accelerator. `max_length_q` (a host int, as sentence-transformers and the
        encoder pass it) sizes the kernels; positions and the re-padding index are computed on the device.
        Boundaries are not validated here (that would read them back): the encoder builds them."""
        if inputs_embeds.shape[0] != 1:
            raise ValueError(f"Packed input (cu_seq_lens_q) must have batch size 1, got {inputs_embeds.shape[0]}.")
        if max_seqlen is None:
            raise ValueError(
                "Packed input needs max_length_q (the longest text's token count, a Python int) when cu_seq_lens_q "
                "is on an accelerator or the model is compiled: reading it from cu_seq_lens_q would sync the device."
            )
        if max_seqlen > self.config.max_position_embeddings:
            _raise_too_long(max_seqlen, self.config.max_position_embeddings)
        device, total = inputs_embeds.device, inputs_embeds.shape[1]
        cu = cu_seqlens.to(device, torch.int64)
        lengths = cu[1:] - cu[:-1]
        text_index = torch.repeat_interleave(torch.arange(lengths.shape[0], device=device), lengths, output_size=total)
        token_position = torch.arange(total, device=device) - cu[text_index]
        if position_ids is None:
            position_ids = token_position
        backend = select_backend(self.config, device, inputs_embeds.dtype)
        if backend in VARLEN_KERNELS:
            heads = (self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim,
                     self.config.is_causal)
            layout = TokenLayout(backend, cu_seqlens=cu.to(torch.int32), max_seqlen=max_seqlen,
                                 gqa_mode=probe_kernel(backend, device, inputs_embeds.dtype, *heads))
        else:
            backend = "packed_masked_eager" if backend == "eager" else "packed_masked_sdpa"
            key_mask = torch.arange(max_seqlen, device=device) < lengths[:, None]
            layout = TokenLayout(backend, key_mask=key_mask[:, None, None, :], max_seqlen=max_seqlen,
                                 text_index=text_index, token_position=token_position)
        return inputs_embeds[0], position_ids.reshape(-1), layout

    def _packed_input(self, inputs_embeds, cu_seqlens, position_ids):
        """Accept an already packed `[1, total_tokens]` batch as sentence-transformers 6 sends it, with its text
        boundaries on the host (where the encoder leaves them): validated and read there, no device sync."""
        if inputs_embeds.shape[0] != 1:
            raise ValueError(f"Packed input (cu_seq_lens_q) must have batch size 1, got {inputs_embeds.shape[0]}.")
        device = inputs_embeds.device
        cu_host = cu_seqlens.detach().to("cpu", torch.int64)
        lengths = (cu_host[1:] - cu_host[:-1]).tolist()
        if cu_host[0] != 0 or cu_host[-1] != inputs_embeds.shape[1] or min(lengths) <= 0:
            raise ValueError(
                f"cu_seq_lens_q must start at 0, increase strictly and end at the token count "
                f"{inputs_embeds.shape[1]}; got {cu_host.tolist()}."
            )
        if max(lengths) > self.config.max_position_embeddings:
            _raise_too_long(max(lengths), self.config.max_position_embeddings)
        if position_ids is None:
            starts = torch.repeat_interleave(cu_host[:-1], torch.tensor(lengths))
            position_ids = (torch.arange(int(cu_host[-1])) - starts).to(device)
        backend = select_backend(self.config, device, inputs_embeds.dtype)
        if backend not in PACKED_BACKENDS:  # eager / sdpa requested: same per-text split, that kernel per text
            backend = "packed_sdpa" if backend == "sdpa" else "packed_eager"
        log_backend_once(backend)
        layout = _packed_layout(self.config, backend, lengths, device, inputs_embeds.dtype)
        return inputs_embeds[0], position_ids.reshape(-1), layout


def _packed_layout(config, backend: str, lengths: list, device, dtype) -> TokenLayout:
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.is_causal)
    gqa_mode = probe_kernel(backend, device, dtype, *heads) if backend in VARLEN_KERNELS else None
    return TokenLayout(backend, cu_seqlens=cu, max_seqlen=max(lengths), lengths=lengths, gqa_mode=gqa_mode)


def check_token_ids(input_ids: torch.Tensor, vocab_size: int):
    """Out-of-range ids give a cryptic IndexError on CPU and a fatal device assert on CUDA: name them instead (read
    on the host: free for host ids, a device sync otherwise). The package's encoder calls it before the copy."""
    low, high = torch.aminmax(input_ids.detach())
    low, high = int(low), int(high)
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids must lie in [0, {vocab_size}) (the model's vocab_size), got values in [{low}, {high}]; "
            "was the text tokenized with a different tokenizer?"
        )


def non_finite_message(rows: list, dtype) -> str:
    """The one wording of a non-finite embedding error (the package's encoder raises it on its host copy)."""
    return (f"Non-finite embeddings for rows {rows} (weights in {dtype}). In float16, Qwen-family backbones overflow: "
            "load with dtype=torch.bfloat16 or torch.float32.")


def _check_finite(embeddings: torch.Tensor, dtype):
    finite = torch.isfinite(embeddings).all(-1)
    if torch.compiler.is_compiling():
        torch._assert_async(finite.all(), non_finite_message("(see eager mode)", dtype))
    elif not finite.all():
        raise FloatingPointError(non_finite_message((~finite).nonzero().flatten().tolist(), dtype))


def _raise_too_long(length: int, limit: int):
    raise ValueError(
        f"A sequence has {length} tokens, more than max_position_embeddings={limit}; truncate the input "
        "(tokenizer truncation=True, max_length=...) before embedding."
    )


class DiffEmbedForEmbedding(DiffEmbedPreTrainedModel):
    """Backbone + mean pooling over the real tokens (float32) + optional L2 normalisation."""

    def __init__(self, config: DiffEmbedConfig):
        super().__init__(config)
        self.model = DiffEmbedModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        **kwargs,
    ) -> DiffEmbedOutput:
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds, **kwargs).last_hidden_state
        if kwargs.get("cu_seq_lens_q") is not None:
            cu = kwargs["cu_seq_lens_q"].to(hidden.device, torch.int64)
            lengths = cu[1:] - cu[:-1]
            # output_size known on the host: no device sync to size the index
            text_index = torch.repeat_interleave(
                torch.arange(len(lengths), device=hidden.device), lengths, output_size=hidden.shape[1]
            )
            sums = hidden.new_zeros(len(lengths), hidden.shape[-1], dtype=torch.float32)
            sums.index_add_(0, text_index, hidden[0].float())
            embeddings = sums / lengths[:, None].float()
        else:
            if attention_mask is None:
                attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
            mask = attention_mask.to(hidden.device, torch.float32)[..., None]
            # An empty text (no real token) pools to zeros, and normalising zeros gives zeros, never NaN.
            embeddings = (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.config.normalize_embeddings:
            embeddings = F.normalize(embeddings, p=2, dim=-1)
        # On a CPU the check reads memory the host already owns (no stream to block), so eager CPU calls keep it;
        # on an accelerator it would block the stream every call: there the encoder checks its host copy instead,
        # and `debug_checks` brings it back for direct calls.
        on_host = embeddings.device.type == "cpu" and not torch.compiler.is_compiling()
        if self.debug_checks or on_host:
            _check_finite(embeddings, self.model.embed_tokens.weight.dtype)
        return DiffEmbedOutput(last_hidden_state=hidden, embeddings=embeddings)


__all__ = ["DiffEmbedPreTrainedModel", "DiffEmbedModel", "DiffEmbedForEmbedding", "DiffEmbedOutput"]
