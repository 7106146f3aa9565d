"""`diffembed convert`: tiny checkpoints in each upstream layout in, DiffEmbed folders out, checked against
transformers' own Qwen2Model / LlamaModel / MistralModel made bidirectional (written by others).

Upstream layout facts reproduced by the tiny sources, and where they come from (stored public copies):

* Dream (Dream-org/Dream-v0-Base-7B / -Instruct-7B; Dream-Coder and DiffuCoder share it). config.json carries
  Qwen2's keys plus model_type "Dream", mask_token_id 151666, pad_token_id 151643, use_sliding_window false,
  sliding_window, max_window_layers, architectures ["DreamModel"] and an auto_map to configuration_dream /
  modeling_dream: `DreamConfig.__init__` in configuration_dream.py (copy in ZHZisZZ/dllm-trainer,
  dllm/pipelines/dream/models/configuration_dream.py) and the DiffuCoder/Dream configs quoted in
  d2f/dllm test suites. Weights use Qwen2's names under `model.` plus an untied `lm_head.weight`; q/k/v carry
  biases and o_proj none (`DreamAttention` in modeling_dream.py, same copy). The tokenizer is
  `tokenization_dream.DreamTokenizer`: vocab.json + merges.txt (its VOCAB_FILES_NAMES), Qwen2's split regex and
  NFC, eos/pad <|endoftext|> (tokenization_dream.py, same copy); the ids 151643 / 151665 <|beginoftext|> /
  151666 <|mask|> are the Dream tokenizer facts of docs/reference/compatibility.md.
* LLaDA (GSAI-ML/LLaDA-8B-Instruct): config.json keys and values as stored in yinj66/support_basis,
  LLaDA-8B-Instruct-B&S-light/config.json (d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size, mlp_ratio,
  embedding_size, vocab_size, max_sequence_length, rope_theta, rms_norm_eps 1e-05, include_bias,
  include_qkv_bias, layer_norm_type "rms", activation_type "silu", block_type "llama", rope_full_precision,
  weight_tying false, mask_token_id 126336, eos/pad 126081, model_type "llada"); tensor names from the
  model.safetensors.index.json in the same folder (model.transformer.wte / blocks.N.{attn_norm, q_proj, k_proj,
  v_proj, attn_out, ff_norm, ff_proj, up_proj, ff_out} / ln_f / ff_out); `ff_proj` is the gate because the
  LLaDA llama block computes act(ff_proj(x)) * up_proj(x) (modeling_llada.py copies found by that line).
  Tokenizer: PreTrainedTokenizerFast, bos <|startoftext|>, eos = pad <|endoftext|>, <|mdm_mask|> at the mask id
  (tokenizer_config.json in the same folder).
* Qwen2.5 / Llama-3 / Mistral: transformers' own Qwen2Config / LlamaConfig / MistralConfig keys and
  *ForCausalLM tensor names (the installed transformers source): Qwen2 has q/k/v biases and no o_proj bias,
  Llama's attention_bias puts a bias on all four projections, Mistral has none; Mistral v0.2 stores
  sliding_window null, v0.1 4096 (MistralConfig's default).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
import torch
from helpers.models import TINY, randomize
from helpers.tensors import additive_mask, make_batch, real_positions
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Model,
)

from diffembed_hf import DiffEmbedForEmbedding, load_dream_tokenizer
from diffembed_hf.cli import main as cli_main
from diffembed_hf.convert import ConversionError, convert_checkpoint, parse_size
from diffembed_hf.errors import UsageError
from diffembed_hf.model_card import is_generated_card

DREAM_VOCAB = 152064
AUTO_MAP = {
    "AutoConfig": "configuration_diffembed.DiffEmbedConfig",
    "AutoModel": "modeling_diffembed.DiffEmbedForEmbedding",
}
FAMILIES = ["dream", "llada", "qwen2", "llama", "mistral"]
TEXTS = ["Photosynthesis turns light into chemical energy.", "def add(a, b): return a + b", "short"]

# transformers LlamaModel name -> LLaDA name (the LLaDA-8B-Instruct index and its llama block, see the docstring).
LLADA_NAMES = {
    "embed_tokens.weight": "model.transformer.wte.weight",
    "norm.weight": "model.transformer.ln_f.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "q_proj.weight",
    "self_attn.k_proj.weight": "k_proj.weight",
    "self_attn.v_proj.weight": "v_proj.weight",
    "self_attn.o_proj.weight": "attn_out.weight",
    "post_attention_layernorm.weight": "ff_norm.weight",
    "mlp.gate_proj.weight": "ff_proj.weight",
    "mlp.up_proj.weight": "up_proj.weight",
    "mlp.down_proj.weight": "ff_out.weight",
}


@dataclass
class Source:
    folder: Path
    reference: torch.nn.Module  # transformers' backbone holding the same weights
    vocab: int


# ----------------------------------------------------------------------------------------------------------
# Tiny upstream checkpoints
# ----------------------------------------------------------------------------------------------------------


def save_checkpoint(folder: Path, config: dict, tensors: dict, shards: int = 2) -> None:
    """config.json + `shards` safetensors files (tensors interleaved, as upstream indexes spread them) + index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    names, weight_map = list(tensors), {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        group = names[i::shards]
        save_file({n: tensors[n].contiguous() for n in group}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_tiny_tokenizer(folder: Path, specials: dict, *, tokenizer_class="PreTrainedTokenizerFast", extra=None,
                        **roles):
    """A WordLevel tokenizer over 128 ids: words w<id>, plus `specials` {id: token}; `roles` e.g. eos_token=..."""
    vocab = {specials.get(i, f"w{i}"): i for i in range(TINY["vocab_size"])}
    backend = Tokenizer(WordLevel(vocab, unk_token=specials[0]))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=specials[0], **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": [t for i, t in specials.items() if i]})
    tokenizer.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class=tokenizer_class, **(extra or {}))
    path.write_text(json.dumps(config, indent=2))


def hf_tensors(reference: torch.nn.Module, lm_head: bool) -> dict:
    """A *ForCausalLM checkpoint's names: the backbone under `model.`, plus `lm_head.weight` when untied."""
    tensors = {f"model.{name}": t.clone() for name, t in reference.state_dict().items()}
    if lm_head:
        tensors["lm_head.weight"] = torch.randn(reference.config.vocab_size, reference.config.hidden_size)
    return tensors


def qwen2_config_dict(model_type="qwen2", **overrides) -> dict:
    """Qwen2.5-style config.json (Qwen2Config keys)."""
    config = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,  # 151643 in Qwen2.5
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": TINY["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": TINY["intermediate_size"], "max_position_embeddings": 32768, "max_window_layers": 2,
        "model_type": model_type, "num_attention_heads": TINY["num_attention_heads"],
        "num_hidden_layers": TINY["num_hidden_layers"], "num_key_value_heads": TINY["num_key_value_heads"],
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True,
        "torch_dtype": "float32", "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": TINY["vocab_size"],
    }  # fmt: skip
    config.update(overrides)
    return config


def qwen2_reference(vocab: int, seed: int) -> Qwen2Model:
    config = Qwen2Config(**{**TINY, "vocab_size": vocab}, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return randomize(Qwen2Model(config), seed).eval()


def build_qwen2(folder: Path) -> Source:
    ref = qwen2_reference(TINY["vocab_size"], seed=1)
    save_checkpoint(folder, qwen2_config_dict(), hf_tensors(ref, lm_head=False))  # Qwen2.5 small models tie
    save_tiny_tokenizer(folder, {0: "<unk>", 1: "<|endoftext|>", 2: "<|im_end|>"},
                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return Source(folder, ref, TINY["vocab_size"])


def dream_tokenizer_files(folder: Path) -> None:
    """Dream's upstream tokenizer layout: vocab.json + merges.txt + tokenizer_config.json naming the remote
    DreamTokenizer, plus tokenization_dream.py - here a file that fails if anything ever runs it."""
    dream = load_dream_tokenizer()
    model = json.loads(dream.backend_tokenizer.to_str())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": t.special} for i, t in dream.added_tokens_decoder.items()}
    config = {
        "added_tokens_decoder": added, "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|endoftext|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "DreamTokenizer", "unk_token": None,
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenization_dream.py").write_text("raise RuntimeError('the converter must not run remote code')\n")


def build_dream(folder: Path) -> Source:
    ref = qwen2_reference(DREAM_VOCAB, seed=2)
    config = qwen2_config_dict(
        "Dream", architectures=["DreamModel"], vocab_size=DREAM_VOCAB, bos_token_id=151643, eos_token_id=151643,
        pad_token_id=151643, mask_token_id=151666, max_position_embeddings=131072, tie_word_embeddings=False,
        auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        rope_scaling=None, use_cache=False, transformers_version="4.46.2",
    )
    save_checkpoint(folder, config, hf_tensors(ref, lm_head=True), shards=3)
    dream_tokenizer_files(folder)
    return Source(folder, ref, DREAM_VOCAB)


def llada_config_dict(**overrides) -> dict:
    """LLaDA-8B-Instruct's config.json keys, tiny values (the 8B values in comments)."""
    config = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama",
        "d_model": TINY["hidden_size"],  # 4096
        "embedding_dropout": 0.0, "embedding_size": TINY["vocab_size"],  # 126464
        "eos_token_id": 126, "flash_attention": False, "include_bias": False, "include_qkv_bias": False,
        "init_cutoff_factor": None, "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02,
        "input_emb_norm": False, "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "mask_token_id": 127,  # 126336
        "max_sequence_length": 4096, "mlp_hidden_size": TINY["intermediate_size"],  # 12288
        "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
        "n_heads": TINY["num_attention_heads"], "n_kv_heads": TINY["num_attention_heads"],  # 32 = 32
        "n_layers": TINY["num_hidden_layers"], "pad_token_id": 126,  # 126081
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
        "rope_full_precision": True, "rope_theta": 500000.0, "scale_logits": False,
        "transformers_version": "4.46.3", "use_cache": False, "vocab_size": TINY["vocab_size"], "weight_tying": False,
    }  # fmt: skip
    config.update(overrides)
    return config


def llada_tensors(ref: LlamaModel) -> dict:
    tensors = {}
    for name, tensor in ref.state_dict().items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        target = f"model.transformer.blocks.{match[1]}.{LLADA_NAMES[match[2]]}" if match else LLADA_NAMES[name]
        tensors[target] = tensor.clone()
    tensors["model.transformer.ff_out.weight"] = torch.randn(TINY["vocab_size"], TINY["hidden_size"])  # LM head
    return tensors


def build_llada(folder: Path) -> Source:
    config = LlamaConfig(**{**TINY, "num_key_value_heads": TINY["num_attention_heads"], "rms_norm_eps": 1e-5},
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    ref = randomize(LlamaModel(config), seed=3).eval()
    save_checkpoint(folder, llada_config_dict(), llada_tensors(ref), shards=3)
    save_tiny_tokenizer(folder, {0: "<unk>", 125: "<|startoftext|>", 126: "<|endoftext|>", 127: "<|mdm_mask|>"},
                        extra={"trust_remote_code": True}, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                        pad_token="<|endoftext|>")
    return Source(folder, ref, TINY["vocab_size"])


def llama_config_dict(**overrides) -> dict:
    """Llama-3-8B-Instruct-style config.json (LlamaConfig keys)."""
    config = {
        "architectures": ["LlamaForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": TINY["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": TINY["intermediate_size"], "max_position_embeddings": 8192, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": TINY["num_attention_heads"],
        "num_hidden_layers": TINY["num_hidden_layers"], "num_key_value_heads": TINY["num_key_value_heads"],
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.40.0", "use_cache": True,
        "vocab_size": TINY["vocab_size"],
    }  # fmt: skip
    config.update(overrides)
    return config


def build_llama(folder: Path) -> Source:
    # attention_bias=True: Llama then has an o_proj bias too (DiffEmbed's attention_output_bias).
    config = LlamaConfig(**{**TINY, "rms_norm_eps": 1e-5}, attention_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    ref = randomize(LlamaModel(config), seed=4).eval()
    save_checkpoint(folder, llama_config_dict(), hf_tensors(ref, lm_head=True))
    save_tiny_tokenizer(folder, {0: "<unk>", 1: "<|begin_of_text|>", 2: "<|end_of_text|>"},
                        bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")  # no pad token, as Llama 3
    return Source(folder, ref, TINY["vocab_size"])


def mistral_config_dict(**overrides) -> dict:
    """Mistral-7B-Instruct-v0.2-style config.json (MistralConfig keys; v0.1 has sliding_window 4096)."""
    config = {
        "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": TINY["hidden_size"], "initializer_range": 0.02,
        "intermediate_size": TINY["intermediate_size"], "max_position_embeddings": 32768, "model_type": "mistral",
        "num_attention_heads": TINY["num_attention_heads"], "num_hidden_layers": TINY["num_hidden_layers"],
        "num_key_value_heads": TINY["num_key_value_heads"], "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "float32",
        "transformers_version": "4.36.0", "use_cache": True, "vocab_size": TINY["vocab_size"],
    }  # fmt: skip
    config.update(overrides)
    return config


def build_mistral(folder: Path, head_dim=None, **overrides) -> Source:
    config = MistralConfig(**{**TINY, "rms_norm_eps": 1e-5}, sliding_window=None, head_dim=head_dim,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    ref = randomize(MistralModel(config), seed=5).eval()
    if head_dim is not None:  # Mistral-Nemo style: head_dim 128 with hidden 5120 / 32 heads
        overrides["head_dim"] = head_dim
    save_checkpoint(folder, mistral_config_dict(**overrides), hf_tensors(ref, lm_head=True))
    save_tiny_tokenizer(folder, {0: "<unk>", 1: "<s>", 2: "</s>"}, bos_token="<s>", eos_token="</s>")
    return Source(folder, ref, TINY["vocab_size"])


BUILDERS = {
    "dream": build_dream, "llada": build_llada, "qwen2": build_qwen2, "llama": build_llama, "mistral": build_mistral,
}  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("converted")
    return {name: convert_checkpoint(source.folder, root / name) for name, source in sources.items()}


def leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders a conversion may have left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------------------
# Parity and the output folder
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_transformers_bidirectional(family, side, sources, converted):
    """fp32 last_hidden_state within 1e-5 of transformers' model (explicit 4-D non-causal mask, real-token
    positions), and every weight bit-identical. LLaDA needs no wider tolerance: its float32 RoPE rotation
    (config rope_fp32=True) is exactly the reference's rotation when the model runs in float32; it only
    changes numerics in bf16/fp16, where transformers' Llama rotates in the model dtype."""
    source, model = sources[family], DiffEmbedForEmbedding.from_pretrained(converted[family]).eval()
    reference = source.reference.state_dict()
    ours = {name.removeprefix("model."): t for name, t in model.state_dict().items()}
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    ids, mask = make_batch([9, 3, 6, 1], side, vocab=source.vocab, seed=11)
    with torch.no_grad():
        expected = source.reference(input_ids=ids, attention_mask=additive_mask(mask),
                                    position_ids=real_positions(mask)).last_hidden_state
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)


def test_head_dim_is_mapped(tmp_path):
    """A config.json head_dim that is not hidden_size / heads (32 vs 64 / 4) gives the same states too."""
    source = build_mistral(tmp_path / "source", head_dim=32)
    model = DiffEmbedForEmbedding.from_pretrained(convert_checkpoint(source.folder, tmp_path / "out")).eval()
    assert model.config.head_dim == 32 and model.model.layers[0].self_attn.q_proj.weight.shape == (128, 64)
    ids, mask = make_batch([7, 4], "left", seed=12)
    with torch.no_grad():
        expected = source.reference(input_ids=ids, attention_mask=additive_mask(mask),
                                    position_ids=real_positions(mask)).last_hidden_state
        actual = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


EXPECTED_CONFIG = {  # family -> (attention_bias, attention_output_bias, rope_fp32, eps, theta, max positions, ids)
    "dream": (True, False, False, 1e-6, 1e6, 131072, {"pad_token_id": 151643, "mask_token_id": 151666}),
    "llada": (False, False, True, 1e-5, 5e5, 4096, {"pad_token_id": 126, "eos_token_id": 126, "mask_token_id": 127}),
    "qwen2": (True, False, False, 1e-6, 1e6, 32768, {"pad_token_id": 1, "eos_token_id": 2}),
    "llama": (True, True, False, 1e-5, 5e5, 8192, {"pad_token_id": 2, "eos_token_id": 2, "bos_token_id": 1}),
    "mistral": (False, False, False, 1e-5, 1e6, 32768, {"pad_token_id": 2, "eos_token_id": 2}),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_output_folder_is_complete(family, sources, converted):
    folder = converted[family]
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "configuration_diffembed.py", "modeling_diffembed.py", "attention_kernels.py",
            "model.safetensors", "README.md", "tokenizer.json", "tokenizer_config.json"} <= files
    assert "__init__.py" not in files and "model.safetensors.index.json" not in files  # tiny: one shard
    assert not any(name.startswith(("tokenization_", "modeling_dream", "configuration_llada")) for name in files)
    config = json.loads((folder / "config.json").read_text())
    qkv_bias, o_bias, rope_fp32, eps, theta, positions, ids = EXPECTED_CONFIG[family]
    assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["DiffEmbedForEmbedding"]
    assert config["model_type"] == "diffembed" and config["dtype"] == "float32" and not config["is_causal"]
    biases = (config["attention_bias"], config["attention_output_bias"])
    assert biases == (qkv_bias, o_bias) and config["rope_fp32"] == rope_fp32
    assert (config["rms_norm_eps"], config["rope_theta"], config["max_position_embeddings"]) == (eps, theta, positions)
    assert {key: config.get(key) for key in ids} == ids
    if family not in ("dream", "llada"):
        assert "mask_token_id" not in config
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert len(names) == 2 + 9 * 2 + (6 if qkv_bias else 0) + (2 if o_bias else 0)  # no LM head, only DiffEmbed's
    assert all(n.startswith(("model.embed_tokens.", "model.layers.", "model.norm.")) for n in names)
    card = (folder / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---\n")[1])
    assert metadata["library_name"] == "sentence-transformers" and metadata["pipeline_tag"] == "sentence-similarity"
    assert "- custom_code" in card and "- diffembed" in card and "base_model" not in card  # local source
    assert str(sources[family].folder) in card and "Not trained as an embedder" in card
    assert "trust_remote_code=True" in card and "diffembed convert" in card
    assert f'AutoModel.from_pretrained("{folder.name}", trust_remote_code=True)' in card  # the folder's own name
    assert is_generated_card(card) and "## Conversion" in card  # the one card builder
    st_config = json.loads((folder / "sentence_bert_config.json").read_text())
    assert st_config["max_seq_length"] == min(positions, 4096)
    assert json.loads((folder / "modules.json").read_text())[-1]["type"].endswith("Normalize")


def test_tokenizers_keep_pad_and_special_tokens(converted):
    dream, reference = AutoTokenizer.from_pretrained(converted["dream"], trust_remote_code=True), load_dream_tokenizer()
    texts = ["Hello world", " café  naïve\n\n日本語", "<|mask|> x<|endoftext|> 12345"]
    assert [dream(t)["input_ids"] for t in texts] == [reference(t)["input_ids"] for t in texts]
    assert (dream.pad_token, dream.pad_token_id, dream.mask_token, dream.mask_token_id) == (
        "<|endoftext|>", 151643, "<|mask|>", 151666)
    assert "auto_map" not in json.loads((converted["dream"] / "tokenizer_config.json").read_text())
    assert dream.model_max_length == 131072

    llada = AutoTokenizer.from_pretrained(converted["llada"], trust_remote_code=True)
    assert (llada.pad_token, llada.eos_token, llada.bos_token) == ("<|endoftext|>", "<|endoftext|>", "<|startoftext|>")
    assert (llada.mask_token, llada.mask_token_id, llada.model_max_length) == ("<|mdm_mask|>", 127, 4096)
    qwen2 = AutoTokenizer.from_pretrained(converted["qwen2"], trust_remote_code=True)
    assert (qwen2.pad_token, qwen2.eos_token) == ("<|endoftext|>", "<|im_end|>")
    for family in ("llama", "mistral"):  # no pad token upstream: padding with eos
        tokenizer = AutoTokenizer.from_pretrained(converted[family], trust_remote_code=True)
        assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.pad_token_id == 2


def test_sharded_output_keeps_dtype(sources, tmp_path):
    """A bf16 source, output capped at 20 kB per shard: several shards + index, bytes and dtypes unchanged."""
    source = tmp_path / "bf16"
    tensors = {f"model.{k}": v.to(torch.bfloat16) for k, v in sources["qwen2"].reference.state_dict().items()}
    save_checkpoint(source, qwen2_config_dict(torch_dtype="bfloat16"), tensors)
    out = convert_checkpoint(source, tmp_path / "out", max_shard_size="20kB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    written = {}
    for shard in shards:
        part = load_file(str(out / shard))
        assert all(index["weight_map"][name] == shard for name in part)
        written.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    assert written.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], tensor), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert DiffEmbedForEmbedding.from_pretrained(out).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# Sliding windows, bad input, atomicity
# ----------------------------------------------------------------------------------------------------------


def test_sliding_window_is_refused_unless_ignored(tmp_path):
    """Mistral v0.1 (sliding_window 4096 < 32768 positions): refused; with the flag, full attention and the
    default max_seq_length capped at the window, where full attention equals the source's."""
    build_mistral(tmp_path / "v01", sliding_window=4096, rope_theta=10000.0)
    with pytest.raises(ConversionError, match=r"config\.json.*sliding_window=4096.*--ignore-sliding-window"):
        convert_checkpoint(tmp_path / "v01", tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
    out = convert_checkpoint(tmp_path / "v01", tmp_path / "out", ignore_sliding_window=True)
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 4096
    assert "Sliding window ignored" in (out / "README.md").read_text()
    assert "--ignore-sliding-window" in (out / "README.md").read_text()

    qwen = tmp_path / "qwen-window"
    save_checkpoint(qwen, qwen2_config_dict(use_sliding_window=True, sliding_window=64),
                    hf_tensors(qwen2_reference(TINY["vocab_size"], 0), lm_head=False))
    with pytest.raises(ConversionError, match="sliding_window=64"):
        convert_checkpoint(qwen, tmp_path / "out2")
    assert json.loads((convert_checkpoint(qwen, tmp_path / "out2", ignore_sliding_window=True, max_seq_length=32)
                       / "sentence_bert_config.json").read_text())["max_seq_length"] == 32


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_shard(folder: Path, shard: str, change):
    path = folder / shard
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def drop_from_index_and_shard(folder: Path, name: str):
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))
    edit_shard(folder, shard, lambda t: t.pop(name))


def shard_of(folder: Path, name: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]


UP = "model.layers.1.mlp.up_proj.weight"
LLADA_UP = "model.transformer.blocks.1.up_proj.weight"


def rename_shard_away(folder: Path):
    (folder / shard_of(folder, UP)).rename(folder / "renamed.safetensors")


def pickle_only(folder: Path):
    torch.save(load_file(str(folder / shard_of(folder, UP))), folder / "pytorch_model.bin")
    for path in folder.glob("model*"):
        path.unlink()


def add_unexpected(folder: Path):
    edit_shard(folder, shard_of(folder, UP), lambda t: t.update({"model.layers.7.mlp.up_proj.weight": t[UP].clone()}))


BAD_INPUTS = {
    # case: (family to build, how to break it, regex the error must match)
    "no config.json": ("qwen2", lambda f: (f / "config.json").unlink(), r"has no config\.json"),
    "unknown model_type": ("qwen2", lambda f: edit_json(f / "config.json", model_type="gpt2"),
                           r"config\.json: model_type 'gpt2' is not a supported source.*--family"),
    "missing tensor": ("qwen2", lambda f: drop_from_index_and_shard(f, UP), rf"missing tensor.*{re.escape(UP)}"),
    "missing LLaDA tensor": ("llada", lambda f: drop_from_index_and_shard(f, LLADA_UP),
                             rf"missing tensor.*{re.escape(LLADA_UP)}"),
    "misshapen tensor": ("qwen2", lambda f: edit_shard(f, shard_of(f, UP), lambda t: t.update({UP: t[UP][:-1]})),
                         rf"tensor {re.escape(UP)} in model-0000\d-of-00002\.safetensors has shape \[95, 64\]"
                         r".*config\.json implies \[96, 64\]"),
    "index names a missing shard": ("qwen2", rename_shard_away,
                                    r"model\.safetensors\.index\.json names shard model-0000\d-of-00002\.safetensors,"
                                    r" which is missing"),
    "pickle-only weights": ("qwen2", pickle_only, r"only pickle weights \(pytorch_model\.bin\).*allow_pickle"),
    "unexpected tensor": ("qwen2", add_unexpected,
                          r"unexpected tensor model\.layers\.7\.mlp\.up_proj\.weight in model-"),
    "LLaDA LayerNorm": ("llada", lambda f: edit_json(f / "config.json", layer_norm_type="default"),
                        r"layer_norm_type='default' is not supported.*RMSNorm"),
    "LLaDA biases": ("llada", lambda f: edit_json(f / "config.json", include_bias=True), r"include_bias=True"),
    "LLaDA MoE": ("llada", lambda f: edit_json(f / "config.json", moe_num_experts=8), r"mixture-of-experts"),
    "scaled RoPE": ("llama", lambda f: edit_json(f / "config.json", rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}), r"config\.json: .*rope_type='llama3'"),
    "quantized": ("mistral", lambda f: edit_json(f / "config.json", quantization_config={"quant_method": "gptq"}),
                  r"quantized checkpoint \(quant_method='gptq'\)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_writes_nothing(case, tmp_path):
    family, breaks, message = BAD_INPUTS[case]
    source = BUILDERS[family](tmp_path / "source").folder
    breaks(source)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_sources_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_checkpoint(tmp_path / "nope" / "model", tmp_path / "out")
    monkeypatch.chdir(tmp_path)  # a relative path that looks like a Hub id, with HF_HUB_OFFLINE=1 (conftest)
    with pytest.raises(ConversionError, match=r"'no-such-org/no-such-model' is not a local folder.*Hugging Face Hub"):
        convert_checkpoint("no-such-org/no-such-model", tmp_path / "out")
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_hub_id_from_the_local_cache_offline(sources, tmp_path, monkeypatch):
    """A Hub id that huggingface_hub's cache holds converts offline; the card then names it as base_model."""
    import huggingface_hub.constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir()
    snapshot.symlink_to(sources["llama"].folder, target_is_directory=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    out = convert_checkpoint("tiny-org/tiny-llama", tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "\nbase_model: tiny-org/tiny-llama\n" in card and "converted from `tiny-org/tiny-llama`" in card
    assert (out / "model.safetensors").is_file()


def test_existing_output_is_kept_unless_overwrite(sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        convert_checkpoint(sources["llama"].folder, out)
    assert (out / "keep.txt").read_text() == "old"
    convert_checkpoint(sources["llama"].folder, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_a_conversion_finished_meanwhile_is_never_replaced_without_overwrite(sources, tmp_path, monkeypatch):
    """A second conversion into OUT that finishes while this one works (issue 31): this one used to check OUT at
    its start, lock OUT at its end, and replace the other's folder with exit 0; now it locks first."""
    import diffembed_hf.convert.folder as folder_module
    from helpers.locks import run_before_the_lock

    out = tmp_path / "out"
    other = run_before_the_lock(monkeypatch, folder_module,
                                lambda: convert_checkpoint(sources["qwen2"].folder, out))
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        convert_checkpoint(sources["llama"].folder, out)
    assert other == [out]  # the other run finished, and its folder is kept
    assert json.loads((out / "diffembed_conversion.json").read_text())["family"] == "qwen2"
    assert leftovers(tmp_path) == []


def test_error_while_writing_leaves_nothing(sources, tmp_path, monkeypatch):
    """A failure after the first shard (disk full, say) removes the temporary folder; an old OUT survives."""
    import diffembed_hf.convert.weights as convert

    real, calls = convert._write_shard, []

    def fail_on_second_shard(path, *args):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *args)

    monkeypatch.setattr(convert, "_write_shard", fail_on_second_shard)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(sources["qwen2"].folder, tmp_path / "out", max_shard_size="20kB")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    (tmp_path / "out").mkdir()
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(sources["qwen2"].folder, tmp_path / "out", max_shard_size="20kB", overwrite=True)
    assert (tmp_path / "out").is_dir() and leftovers(tmp_path) == []


def test_pickle_weights_only_with_opt_in(sources, tmp_path):
    source = tmp_path / "pickle"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(llama_config_dict()))
    tensors = hf_tensors(sources["llama"].reference, lm_head=True)
    torch.save(tensors, source / "pytorch_model.bin")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*allow_pickle=True \(--allow-pickle\)"):
        convert_checkpoint(source, tmp_path / "out")
    out = convert_checkpoint(source, tmp_path / "out", allow_pickle=True)
    written = load_file(str(out / "model.safetensors"))
    assert written.keys() == tensors.keys() - {"lm_head.weight"}
    assert all(torch.equal(written[name], tensors[name]) for name in written)
    assert "--allow-pickle" in (out / "README.md").read_text()


CUSTOM_TOKENIZER = """
from transformers import PreTrainedTokenizerFast


class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


def test_remote_code_tokenizer_needs_trust(sources, tmp_path):
    source = tmp_path / "custom"
    save_checkpoint(source, mistral_config_dict(), hf_tensors(sources["mistral"].reference, lm_head=True))
    save_tiny_tokenizer(source, {0: "<unk>", 1: "<s>", 2: "</s>"}, tokenizer_class="CustomTokenizer",
                        extra={"auto_map": {"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]}},
                        eos_token="</s>")
    (source / "tokenization_custom.py").write_text(CUSTOM_TOKENIZER)
    with pytest.raises(ConversionError, match=r"tokenizer_config\.json: the tokenizer needs remote code.*--trust-"):
        convert_checkpoint(source, tmp_path / "out")
    out = convert_checkpoint(source, tmp_path / "out", trust_remote_code=True)
    assert (out / "tokenization_custom.py").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert type(tokenizer).__name__ == "CustomTokenizer" and tokenizer.pad_token == "</s>"


def test_source_without_tokenizer_warns(sources, tmp_path, caplog):
    source = tmp_path / "bare"
    save_checkpoint(source, qwen2_config_dict(), hf_tensors(sources["qwen2"].reference, lm_head=False))
    out = convert_checkpoint(source, tmp_path / "out")
    assert "no tokenizer files" in caplog.text
    assert not any(p.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")) for p in out.iterdir())


@pytest.mark.parametrize("size, error", [("5 GB", None), ("1.5GiB", None), ("0", "positive"), ("5 parsecs", "'5GB'")])
def test_max_shard_size_is_validated(size, error):
    if error is None:
        assert parse_size(size) == (5 * 10**9 if size == "5 GB" else int(1.5 * 2**30))
    else:
        with pytest.raises(UsageError, match=error):
            parse_size(size)


def test_cli_convert(sources, tmp_path, capsys):
    assert cli_main(["convert", str(sources["llada"].folder), str(tmp_path / "out"), "--family", "llada",
                     "--max-seq-length", "256"]) == 0
    assert "DiffEmbed folder" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    assert "--family llada" in (tmp_path / "out" / "README.md").read_text()
    assert cli_main(["convert", str(sources["llada"].folder), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# The converted folder in a fresh process (AutoModel remote code, sentence-transformers)
# ----------------------------------------------------------------------------------------------------------

HUB_USER = textwrap.dedent(
    """
    import json, sys, torch
    sys.modules["diffembed_hf"] = None  # a Hub user without this package
    from transformers import AutoModel, AutoTokenizer
    folder, texts, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        result = {"automodel": model(**batch).embeddings.tolist(), "module": type(model).__module__,
                  "kernels": [name for name in sys.modules if name.endswith(".attention_kernels")]}
    try:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
        result["sentence_transformers"] = st.encode(texts, convert_to_tensor=True).tolist()
    except ImportError:
        pass
    json.dump(result, open(out, "w"))
    """
)


@pytest.mark.parametrize("family", ["dream", "llada"])
def test_fresh_process_loads_converted_folder(family, converted, tmp_path):
    folder = converted[family]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    texts = TEXTS if family == "dream" else ["w5 w9 w17 w3", "w100 <|mdm_mask|> w2", "w7"]
    subprocess.run([sys.executable, "-c", HUB_USER, str(folder), json.dumps(texts), str(tmp_path / "out.json")],
                   check=True, env=env, cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL)
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["module"].startswith("transformers_modules")
    # the folder's own copy of the second remote-code file ran, beside its model file
    assert [name.rsplit(".", 1)[0] for name in result["kernels"]] == [result["module"].rsplit(".", 1)[0]]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = DiffEmbedForEmbedding.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).embeddings
    torch.testing.assert_close(torch.tensor(result["automodel"]), expected, rtol=1e-5, atol=1e-5)
    try:
        import diffembed_hf.sentence_transformer  # noqa: F401
    except ImportError:
        pytest.skip("sentence-transformers files arrive with diffembed_hf.sentence_transformer")
    torch.testing.assert_close(torch.tensor(result["sentence_transformers"]), expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# A checkpoint over 1 GB: peak memory, and a conversion killed mid-way
# ----------------------------------------------------------------------------------------------------------

# Fixed overhead allowed on top of the shard bound: the child's RSS right after importing python, torch,
# transformers, safetensors and diffembed_hf measures about 370 MB on CPU torch 2.13 / transformers 5.24.
FIXED_OVERHEAD = 512 * 2**20
BIG = dict(vocab_size=32768, hidden_size=4096, intermediate_size=8192, num_hidden_layers=3, num_attention_heads=32,
           num_key_value_heads=8)  # bf16: embed + lm_head 2 x 256 MiB, 272 MiB per layer -> 1.33 GiB in total


@pytest.fixture(scope="module")
def big_source(tmp_path_factory):
    """A Qwen2-layout bf16 checkpoint of 1.33 GiB in 4 shards of at most ~336 MiB, filled with per-tensor constants."""
    folder = tmp_path_factory.mktemp("big") / "source"
    folder.mkdir()
    config = qwen2_config_dict(**BIG, tie_word_embeddings=False, torch_dtype="bfloat16")
    (folder / "config.json").write_text(json.dumps(config))
    with torch.device("meta"):
        shapes = {f"model.{k}": v.shape for k, v in Qwen2Model(Qwen2Config(**BIG)).state_dict().items()}
    shapes["lm_head.weight"] = torch.Size([BIG["vocab_size"], BIG["hidden_size"]])
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * 2
        if current and size + nbytes > 340 * 2**20:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: torch.full(shapes[n], list(shapes).index(n) % 97, dtype=torch.bfloat16) for n in names},
                  str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    yield folder
    shutil.rmtree(folder)  # pytest keeps the last runs' temp folders: do not keep gigabytes there


@pytest.fixture
def big_out(tmp_path) -> Path:
    yield tmp_path / "out"
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys

    def status(key):  # this process's own counters: ru_maxrss would inherit the parent's peak across exec
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    import torch, transformers, safetensors
    from diffembed_hf.convert import convert_checkpoint
    imports = status("VmRSS")
    convert_checkpoint(sys.argv[1], sys.argv[2], max_shard_size="400MB")
    print(json.dumps({"imports": imports, "peak": status("VmHWM")}))
    """
)


def test_peak_memory_is_bounded_by_a_shard(big_source, big_out):
    largest = max(p.stat().st_size for p in big_source.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in big_source.glob("*.safetensors"))
    assert total > 2**30 and len(list(big_source.glob("*.safetensors"))) >= 3
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(big_source), str(big_out)],
                            check=True, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"\npeak RSS {measured['peak'] / 2**20:.0f} MiB (imports {measured['imports'] / 2**20:.0f} MiB); "
          f"largest shard {largest / 2**20:.0f} MiB, checkpoint {total / 2**20:.0f} MiB")
    assert measured["imports"] < FIXED_OVERHEAD
    assert measured["peak"] < 1.5 * largest + FIXED_OVERHEAD
    index = json.loads((big_out / "model.safetensors.index.json").read_text())
    with torch.device("meta"):
        backbone_bytes = sum(t.numel() * 2 for t in Qwen2Model(Qwen2Config(**BIG)).state_dict().values())
    assert index["metadata"]["total_size"] == backbone_bytes  # everything but lm_head, still bf16
    name = "model.layers.2.mlp.down_proj.weight"
    with safe_open(str(big_out / index["weight_map"][name]), framework="pt") as f:
        tensor = f.get_slice(name)[:2]
    assert tensor.dtype == torch.bfloat16 and (tensor == tensor.flatten()[0]).all()


def interrupt_conversion(source: Path, out: Path, sig: int) -> None:
    """Run `diffembed convert` in a subprocess and send `sig` while its first output shard is being written."""
    proc = subprocess.Popen([sys.executable, "-m", "diffembed_hf.cli", "convert", str(source), str(out),
                             "--max-shard-size", "200MB"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(out.parent.glob(f".{out.name}.tmp-*/model-*.safetensors")):
            assert proc.poll() is None and time.monotonic() < deadline, "conversion ended before it could be stopped"
            time.sleep(0.005)
    finally:
        proc.send_signal(sig)
        proc.wait(timeout=60)


def test_interrupted_conversion_leaves_no_output_and_rerun_succeeds(big_source, big_out):
    out, tmp_path = big_out, big_out.parent
    interrupt_conversion(big_source, out, signal.SIGTERM)  # the CLI turns SIGTERM into a clean exit
    assert not out.exists() and leftovers(tmp_path) == []
    interrupt_conversion(big_source, out, signal.SIGKILL)  # no cleanup possible: only hidden files stay
    assert not out.exists()
    # the half-built folder and the killed run's lock, which names a process that is gone
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == [".out.lock", ".out.tmp"]
    convert_checkpoint(big_source, out, max_shard_size="200MB")
    assert leftovers(tmp_path) == []  # the killed run's folder and stale lock were removed
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(index["weight_map"]) == 3 * 12 + 2 and all((out / f).is_file() for f in index["weight_map"].values())
