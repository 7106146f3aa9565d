"""Export a DiffEmbed folder for inference engines: `export_vllm` writes a folder that vLLM serves as an embedding
model with its own Qwen2 / Llama code, no remote code.

What vLLM needs, as its source (0.32) reads it:
  * a stock `qwen2` / `llama` config whose `architectures` is `Qwen2Model` / `LlamaModel` (embedding models in its
    registry) and **`is_causal: false`**; without it vLLM runs causal attention, silently. Qwen2 carries q/k/v biases
    and derives head_dim from hidden_size / heads; Llama reads `head_dim`, `attention_bias` (q/k/v and output
    projections) and `mlp_bias`. Both support only SiLU and rotate q/k in the model dtype.
  * weights under Qwen2ForCausalLM / LlamaForCausalLM names: DiffEmbed's own names (`model.embed_tokens`,
    `model.layers.N...`, `model.norm`) are exactly those, and vLLM's pooling adapter accepts them with or without
    the `model.` prefix, so the weight files are hard-linked (or copied), never rewritten;
  * the sentence-transformers `modules.json` + `1_Pooling/config.json` (mean pooling) + `2_Normalize`, from which
    it takes mean pooling and normalisation, and `sentence_bert_config.json`'s `max_seq_length` as max_model_len.

The folder is built in a hidden temporary folder beside OUT and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, Qwen2Config

from .model_folder import (
    CONFIG,
    LICENSE_PATTERNS,
    TOKENIZER_FILES,
    TOKENIZER_PATTERNS,
    check_folder,
    check_model_files,
    check_weights_match,
    inside,
    read_json,
    read_json_or_empty,
)
from .errors import ExportError, ModelFilesError, require_extra
from .outputs import final_path, output_lock, staged_folder, temporary_sibling, write_json
from .modeling.configuration_diffembed import DiffEmbedConfig
from .sentence_transformer import DEFAULT_QUERY_PROMPT, pooling_modes, write_sentence_transformer_files

logger = logging.getLogger(__name__)

# vLLM 0.32's CPU attention backend (cpu_attn.py, get_supported_head_sizes). On CUDA, FlashAttention takes any
# multiple of 8 up to 256 (512 with FA4) and Triton any size >= 32, so every size here also runs there; 512 on CUDA
# runs on the Triton / FlexAttention backends.
VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


# ----------------------------------------------------------------------------------------------------------
# Reading and checking the DiffEmbed folder
# ----------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict | list:
    return read_json(path, ExportError)


def _diffembed_config(folder: Path) -> DiffEmbedConfig:
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; pass a DiffEmbed model folder (diffembed convert / train)")
    path = folder / CONFIG
    if not path.is_file():
        raise ExportError(f"{folder} has no config.json; pass a DiffEmbed model folder (or a LoRA adapter folder "
                          "whose base is one)")
    raw = read_json(path, ModelFilesError)  # damaged: exit status 1, as in every command
    if not isinstance(raw, dict) or raw.get("model_type") != "diffembed":
        model_type = raw.get("model_type") if isinstance(raw, dict) else None
        raise ExportError(f"{path}: model_type {model_type!r} is not 'diffembed'; convert the checkpoint "
                          "first (diffembed convert), then export the DiffEmbed folder")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ExportError(f"{path}: scaled RoPE (rope_type={rope_type!r}) is not supported; the export writes the "
                          "default RoPE, which would rotate every position differently")
    try:
        return DiffEmbedConfig.from_dict(raw)
    except (NotImplementedError, ValueError, TypeError) as err:
        raise ExportError(f"{path}: {err}") from err


def _vllm_architecture(config: DiffEmbedConfig, path: Path) -> str:
    """`Qwen2Model` or `LlamaModel`: the vLLM model whose biases, head size and activation match the config."""
    if config.is_causal:
        raise ExportError(f"{path}: is_causal=true (the causal-attention ablation); the export serves the "
                          "bidirectional model only")
    if config.head_dim not in VLLM_HEAD_SIZES:
        raise ExportError(f"{path}: head size {config.head_dim} is not supported by vLLM's attention kernels "
                          f"(supported: {', '.join(map(str, VLLM_HEAD_SIZES))})")
    if config.hidden_act != "silu":
        raise ExportError(f"{path}: hidden_act={config.hidden_act!r}; vLLM's Qwen2 and Llama MLPs support only silu")
    if config.attention_bias == config.attention_output_bias:
        return "LlamaModel"  # Llama's attention_bias covers q/k/v and the output projection; mlp_bias too
    if config.attention_output_bias:
        raise ExportError(f"{path}: an output-projection bias without q/k/v biases has no stock vLLM architecture")
    if config.mlp_bias:
        raise ExportError(f"{path}: q/k/v biases without an output bias need vLLM's Qwen2Model, which has no MLP bias")
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ExportError(f"{path}: q/k/v biases with head_dim {config.head_dim} != hidden_size / heads; vLLM's "
                          "Qwen2Model derives the head size from hidden_size and would run it wrong")
    return "Qwen2Model"


def _pooling(folder: Path) -> tuple[bool, dict]:
    """(normalize, sentence_bert_config) from the folder's sentence-transformers files, which must describe mean
    pooling over every token: that is all vLLM's pooler reproduces."""
    path = folder / "modules.json"
    if not path.is_file():
        raise ExportError(f"{folder} has no modules.json; write the sentence-transformers files first "
                          "(diffembed_hf.sentence_transformer.write_sentence_transformer_files)")
    modules = _read_json(path)
    kinds = [module["type"].rsplit(".", 1)[-1] for module in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ExportError(f"{path}: modules {kinds}; vLLM reproduces Transformer, Pooling (mean) and Normalize only")
    pooling_dir = inside(folder, modules[1]["path"], what=f"{path} (pooling module)")
    pooling = _read_json(pooling_dir / "config.json")
    modes = pooling_modes(pooling)
    if modes != ["mean"]:
        raise ExportError(f"{pooling_dir / 'config.json'}: pooling {modes}; the export supports mean pooling "
                          "only (the DiffEmbed recipe)")
    if not pooling.get("include_prompt", True):
        raise ExportError(f"{pooling_dir / 'config.json'}: include_prompt=false leaves the prompt out of the "
                          "mean, which vLLM (pooling every token) cannot reproduce")
    st_path = folder / "sentence_bert_config.json"
    st_config = _read_json(st_path) if st_path.is_file() else {}
    return kinds[-1] == "Normalize", st_config


def _prompts(folder: Path) -> tuple[dict[str, str], str | None]:
    """The folder's stored prompts and default prompt name."""
    stored = read_json_or_empty(folder / "config_sentence_transformers.json", ExportError)
    return dict(stored.get("prompts") or {}), stored.get("default_prompt_name")


# ----------------------------------------------------------------------------------------------------------
# Writing the engine folder
# ----------------------------------------------------------------------------------------------------------


def stock_config(config: DiffEmbedConfig, architecture: str) -> dict:
    """config.json for vLLM's `Qwen2Model` / `LlamaModel`: the keys of transformers' Qwen2Config / LlamaConfig
    (both `rope_parameters` and the older top-level `rope_theta`) plus `is_causal: false`."""
    fields = dict(
        architectures=[architecture], vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, initializer_range=config.initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, tie_word_embeddings=False,
        use_cache=False, attention_dropout=0.0, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, is_causal=False,
    )  # fmt: skip
    if architecture == "Qwen2Model":
        model_type = "qwen2"
        fields.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.num_hidden_layers)
    else:
        model_type = "llama"
        fields.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
    dtype = str(config.dtype or torch.float32).removeprefix("torch.")
    return {"model_type": model_type, **fields, "rope_theta": config.rope_theta, "dtype": dtype, "torch_dtype": dtype}


def _check_written_config(folder: Path, architecture: str, config: DiffEmbedConfig) -> None:
    """Read config.json back with transformers: the stock class, bidirectional, the same shape."""
    written = AutoConfig.from_pretrained(folder)
    expected_class = Qwen2Config if architecture == "Qwen2Model" else LlamaConfig
    head_dim = getattr(written, "head_dim", None) or written.hidden_size // written.num_attention_heads
    checks = {
        "class": (type(written), expected_class), "is_causal": (getattr(written, "is_causal", True), False),
        "architectures": (written.architectures, [architecture]), "head_dim": (head_dim, config.head_dim),
        "rope_theta": (written.rope_parameters["rope_theta"], config.rope_theta),
        "num_key_value_heads": (written.num_key_value_heads, config.num_key_value_heads),
    }  # fmt: skip
    wrong = {key: got for key, (got, want) in checks.items() if got != want}
    if wrong:
        raise ExportError(f"{folder / 'config.json'} reads back wrong: {wrong}")


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link `source` (the weights stay one copy on disk); copy it where a link is impossible. True if linked."""
    try:
        os.link(source.resolve(), target)
        return True
    except OSError:  # another filesystem, or one without hard links
        shutil.copyfile(source, target)
        return False


def serve_commands(name: str, dtype: str, trust_remote_code: bool = False) -> tuple[str, str]:
    """(one GPU, tensor parallel over 2 GPUs): `vllm serve` with the dtype explicit (vLLM's `auto` turns float32
    weights of a pooling model into float16, which overflows Qwen-family activations)."""
    flags = f"--runner pooling --dtype {dtype}" + (" --trust-remote-code" if trust_remote_code else "")
    return f"vllm serve {name} {flags}", f"vllm serve {name} {flags} --tensor-parallel-size 2"


def _readme(out: Path, source: Path, architecture: str, dtype: str, query_prompt: str, max_seq_length: int,
            heads: int, trust_remote_code: bool) -> str:
    single, parallel = serve_commands(out.name, dtype, trust_remote_code)
    prompt = json.dumps(query_prompt)
    return "\n".join([
        f"# {out.name}: DiffEmbed model for inference engines (vLLM)", "",
        f"Exported by `diffembed export vllm` from the DiffEmbed folder `{source.name}`: the same weights "
        f"(hard-linked where possible: replace those files, never edit them in place) with a stock `{architecture}` "
        "config and **`is_causal: false`**, so that vLLM serves it with its own code: bidirectional attention, "
        "mean pooling, L2 normalisation.", "",
        "**Not for `transformers.AutoModel`.** transformers may run a plain qwen2 / llama config causally, which gives "
        f"different embeddings. Load the DiffEmbed folder `{source.name}` with `trust_remote_code=True` instead.", "",
        "## Serve", "", "```bash", single,
        f"# tensor parallel across 2 GPUs (the {heads} attention heads must split evenly)", parallel, "```", "",
        "Keep `--dtype` explicit: with `auto`, vLLM serves float32 weights of an embedding model in float16. "
        "Without a `vllm` console script: `python -m vllm.entrypoints.openai.api_server --model "
        f"{out.name} ...` takes the same flags.", "",
        "## Queries", "",
        "vLLM's `/v1/embeddings` applies no sentence-transformers prompt. Prepend the query instruction yourself; "
        "documents get none:",
        "", "```python", "from openai import OpenAI", "",
        'client = OpenAI(base_url="http://localhost:8000/v1", api_key="none")',
        f"QUERY_PROMPT = {prompt}",
        f'queries = client.embeddings.create(model="{out.name}", input=[QUERY_PROMPT + "how do plants make energy?"])',
        f'documents = client.embeddings.create(model="{out.name}", input=["Photosynthesis turns light into energy."])',
        "```", "",
        f"Texts longer than {max_seq_length} tokens (sentence_bert_config.json, vLLM's max_model_len) are refused "
        "unless the request sets `truncate_prompt_tokens`.", "",
    ])


def export_vllm(model_folder: str | os.PathLike, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a folder that vLLM serves as an embedding model with no remote code, from a DiffEmbed folder (or a
    LoRA adapter folder, merged into its base first, as `push --merge` merges it).

    Refused with an `ExportError`, leaving no `out`: a folder that is not a DiffEmbed model, a causal-ablation
    config (`is_causal: true`), a scaled RoPE, a head size vLLM's kernels lack, pooling other than mean over every
    token, and an existing `out` unless `overwrite` (then replaced only once the new folder is complete).
    """
    folder, out = Path(model_folder).expanduser().absolute(), final_path(Path(out))
    with output_lock(out):  # first: only a check made under the lock holds until the folder is published
        if out.exists() and not overwrite:
            raise ExportError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out} exists and is not a folder")
        if (folder / "adapter_config.json").is_file() and not (folder / CONFIG).is_file():
            with _merged_adapter(folder, out) as merged:  # as `push --merge` merges it
                return _export(merged, out, overwrite, source=folder)
        return _export(folder, out, overwrite)


@contextlib.contextmanager
def _merged_adapter(adapter: Path, out: Path) -> Iterator[Path]:
    """A LoRA adapter folder merged into its base (a local DiffEmbed folder or a cached Hub id), in a hidden folder
    beside `out` (same file system: the export hard-links its weights), removed afterwards."""
    from .adapters import local_base_path, merge_adapter_files

    check_folder(adapter)
    base = read_json(adapter / "adapter_config.json", ExportError).get("base_model_name_or_path")
    base_path = local_base_path(base) if isinstance(base, str) and base else None
    if base_path is None or not (base_path / CONFIG).is_file():
        raise ExportError(f"{adapter} is a LoRA adapter whose base {base!r} is not a DiffEmbed folder here (a local "
                          "folder or a Hub id in the Hugging Face cache); download the base, then export again")
    _diffembed_config(base_path)
    require_extra("train", ("peft",), what=f"exporting the LoRA adapter {adapter}")
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = temporary_sibling(out, "merge")
    merged.mkdir()
    try:
        merge_adapter_files(adapter, base_path, merged)
        yield merged
    finally:
        shutil.rmtree(merged, ignore_errors=True)


def _export(folder: Path, out: Path, overwrite: bool, source: Path | None = None) -> Path:
    """The export itself, run while `export_vllm` holds the output's lock (OUT already checked); `source` is the
    folder the user named, where `folder` is a merged copy of it."""
    config = _diffembed_config(folder)
    check_folder(folder)  # untrusted: no index, module path or link may lead the export outside it
    # the export copies the tokenizer without loading it: a damaged one is named here, not by vLLM later
    check_model_files(folder, deep=True)
    if out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents:
        raise ExportError(f"the output {out} must not contain the model folder {folder}")
    architecture = _vllm_architecture(config, folder / "config.json")
    weights = check_weights_match(folder, config)
    normalize, st_config = _pooling(folder)
    tokenizer_files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    tokenizer_files += [path for pattern in TOKENIZER_PATTERNS for path in folder.glob(pattern)]
    if not tokenizer_files:
        raise ExportError(f"{folder} has no tokenizer files; vLLM needs the tokenizer to embed text")
    tokenizer_config = folder / "tokenizer_config.json"
    remote_tokenizer = tokenizer_config.is_file() and bool(_read_json(tokenizer_config).get("auto_map"))
    stock = stock_config(config, architecture)

    prompts, default_prompt_name = _prompts(folder)
    max_seq_length = st_config.get("max_seq_length", config.max_position_embeddings)
    with staged_folder(out, replace=overwrite) as tmp:
        write_json(tmp / CONFIG, stock)
        _check_written_config(tmp, architecture, config)
        linked = [_link_or_copy(path, tmp / path.name) for path in weights]
        for path in tokenizer_files + [p for pattern in LICENSE_PATTERNS for p in folder.glob(pattern)]:
            shutil.copyfile(path, tmp / path.name)
        write_sentence_transformer_files(tmp, max_seq_length=max_seq_length, prompts=prompts,
                                         default_prompt_name=default_prompt_name, normalize=normalize,
                                         dimension=config.hidden_size)
        query_prompt = prompts.get("query", DEFAULT_QUERY_PROMPT)
        readme = _readme(out, source or folder, architecture, stock["dtype"], query_prompt,
                         max_seq_length, config.num_attention_heads, remote_tokenizer)
        (tmp / "README.md").write_text(readme, encoding="utf-8")
    logger.info("Wrote %s (%s; %d of %d weight files hard-linked)", out, architecture, sum(linked), len(linked))
    return out


__all__ = ["ExportError", "VLLM_HEAD_SIZES", "export_vllm", "serve_commands", "stock_config"]
