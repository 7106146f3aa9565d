"""Tiny GGUF files written with the `gguf` package's own writer (llama and qwen2 architectures, Q8_0 matrices, a
byte-level BPE tokenizer in the metadata), from a random transformers reference model."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL = "<|endoftext|>"
MERGES = ["t h", "th e", "Ġ t", "h e", "Ġt he", "e r", "o r"]


def tokenizer_vocabulary() -> list[str]:
    """A byte-level BPE vocabulary: the 256 byte symbols, one token per merge, and one control token."""
    tokens = list(bytes_to_unicode().values())
    tokens += ["".join(merge.split(" ")) for merge in MERGES]
    return tokens + [SPECIAL]


def reference_model(architecture: str, vocab: int) -> torch.nn.Module:
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)
    torch.manual_seed(0)
    if architecture == "qwen2":
        model = Qwen2Model(Qwen2Config(**common))
    else:
        model = LlamaModel(LlamaConfig(**common))
    with torch.no_grad():  # random everywhere, norms and biases too, so that no tensor can hide a mapping bug
        for param in model.parameters():
            param.copy_(torch.randn(param.shape) * 0.2)
    return model.eval()


def llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order for the llama architecture (transformers' GGUF loader reverses it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
              "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "self_attn.q_proj.bias": "attn_q.bias",
              "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
              "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}


def write_gguf(path: Path, architecture: str, quantize: bool = True, *, drop: tuple[str, ...] = (),
               block_count: int | None = None, tokenizer: bool = True, merges: bool = True) -> dict[str, np.ndarray]:
    """A GGUF file of a random reference model; returns each HF tensor name -> the values a reader dequantizes
    (the Q8_0 round trip of the matrices, the exact norms and biases). `drop` leaves those GGUF tensors out,
    `block_count` states another layer count, `tokenizer=False` / `merges=False` leave that metadata out."""
    tokens = tokenizer_vocabulary()
    model = reference_model(architecture, len(tokens))
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(f"tiny-{architecture}")
    writer.add_block_count(block_count or config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if token == SPECIAL else 1 for token in tokens])
        if merges:
            writer.add_token_merges(MERGES)
        writer.add_bos_token_id(len(tokens) - 1)
        writer.add_eos_token_id(len(tokens) - 1)
    expected = {}
    for name, tensor in model.state_dict().items():
        values = tensor.numpy().astype(np.float32)
        if name == "embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, layer, rest = name.split(".", 2)
            gguf_name = f"blk.{layer}.{GGUF_NAMES[rest]}"
        if gguf_name in drop:
            continue
        stored = values
        if architecture == "llama" and rest_is(name, "q_proj.weight"):
            stored = llama_permute(values, config.num_attention_heads)
        elif architecture == "llama" and rest_is(name, "k_proj.weight"):
            stored = llama_permute(values, config.num_key_value_heads)
        if quantize and values.ndim == 2:
            packed = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            expected[name] = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
            if stored is not values:  # back to transformers' row order
                heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
                dim = values.shape[0] // heads // 2
                expected[name] = expected[name].reshape(heads, dim, 2, -1).swapaxes(2, 1).reshape(values.shape)
        else:
            writer.add_tensor(gguf_name, stored)
            expected[name] = values
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def rest_is(name: str, suffix: str) -> bool:
    return name.endswith(suffix)
