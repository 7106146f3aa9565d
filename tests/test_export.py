"""`diffembed export vllm`: the folder layout, the stock config (checked against transformers' own Qwen2Model /
LlamaModel made bidirectional), hard links, refusals and atomicity. vLLM itself serves the exports in
tests/engines/check_vllm.py, run in its own environment; nothing here imports vllm."""

import json
import shutil
import stat
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.models import tiny_model
from helpers.tensors import additive_mask, make_batch, real_positions
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoConfig, LlamaConfig, LlamaModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2Model

from diffembed_hf import DiffEmbedForEmbedding
from diffembed_hf.cli import main as cli_main
from diffembed_hf.errors import ModelFilesError
from diffembed_hf.outputs import current_umask
from diffembed_hf.export import VLLM_HEAD_SIZES, ExportError, export_vllm
from diffembed_hf.sentence_transformer import DEFAULT_QUERY_PROMPT, save_sentence_transformer

try:
    from sentence_transformers.sentence_transformer.modules import Pooling
except ImportError:  # sentence-transformers 5
    from sentence_transformers.models import Pooling

pytestmark = pytest.mark.versions  # CI reruns it on the oldest transformers / sentence-transformers

# Bias layouts -> the vLLM architecture that reproduces them (head size 32: 2 heads over hidden 64).
LAYOUTS = {
    "qwen2": (dict(attention_bias=True), "Qwen2Model", Qwen2Model, Qwen2Config),
    "llama": (dict(attention_bias=False, rope_fp32=True), "LlamaModel", LlamaModel, LlamaConfig),
    "llama-biased": (dict(attention_bias=True, attention_output_bias=True), "LlamaModel", LlamaModel, LlamaConfig),
}
HEADS = dict(num_attention_heads=2, num_key_value_heads=1)


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, **{f"w{i}": i for i in range(2, 128)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="<s>")


def diffembed_folder(path: Path, seed: int = 0, max_shard_size=None, **overrides) -> Path:
    model = tiny_model(seed, **{**HEADS, **overrides})
    save_sentence_transformer(model, tokenizer(), path, max_seq_length=256)
    if max_shard_size:  # re-save the weights in several shards
        for weights in path.glob("model*.safetensors"):
            weights.unlink()
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    result = {}
    for name, (overrides, *_) in LAYOUTS.items():
        model = diffembed_folder(root / "models" / name, seed=len(name), **overrides)
        result[name] = (model, export_vllm(model, root / "vllm" / name))
    return result


# ----------------------------------------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_stock_config_is_the_same_model_in_transformers(layout, exported):
    """transformers' own Qwen2Model / LlamaModel, loaded from the export (explicit 4-D non-causal mask), gives the
    DiffEmbed model's last_hidden_state: the stock config's fields describe the same network."""
    model_dir, out = exported[layout]
    _, architecture, reference_class, config_class = LAYOUTS[layout]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["is_causal"] is False and "auto_map" not in config
    assert config["model_type"] == config_class.model_type and config["head_dim"] == 32
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0} and config["rope_theta"] == 1e4
    assert config["dtype"] == config["torch_dtype"] == "float32"
    read_back = AutoConfig.from_pretrained(out)
    assert type(read_back) is config_class and read_back.is_causal is False
    if architecture == "LlamaModel":
        assert config["attention_bias"] == (layout == "llama-biased") and config["mlp_bias"] is False

    reference = reference_class.from_pretrained(out).eval()
    ours = DiffEmbedForEmbedding.from_pretrained(model_dir).eval()
    ids, mask = make_batch([9, 3, 6], "right", seed=5)
    with torch.no_grad():
        expected = ours(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = reference(input_ids=ids, attention_mask=additive_mask(mask),
                           position_ids=real_positions(mask)).last_hidden_state
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)


def test_control_causal_reference_differs(exported):
    """The comparison above can fail: transformers' Qwen2Model with a causal mask is far from our states."""
    model_dir, out = exported["qwen2"]
    reference = Qwen2Model.from_pretrained(out).eval()
    ours = DiffEmbedForEmbedding.from_pretrained(model_dir).eval()
    ids = torch.randint(2, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    causal = torch.full((12, 12), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        expected = ours(input_ids=ids).last_hidden_state
        actual = reference(input_ids=ids, attention_mask=causal).last_hidden_state
    assert (actual - expected).abs().max() > 0.1


def test_export_leaves_the_mode_of_linked_source_weights_alone(exported, tmp_path):
    """The export's files get the user's umask, but a hard-linked weights file is the source's own file too."""
    source = tmp_path / "source"
    shutil.copytree(exported["qwen2"][0], source)
    (source / "model.safetensors").chmod(0o444)  # a user's deliberately read-only weights
    out = export_vllm(source, tmp_path / "vllm")
    assert (out / "model.safetensors").stat().st_ino == (source / "model.safetensors").stat().st_ino
    assert stat.S_IMODE((source / "model.safetensors").stat().st_mode) == 0o444
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o666 & ~current_umask()  # control: ours


def test_files_weights_linked_and_pooling_in_both_key_styles(exported):
    model_dir, out = exported["qwen2"]
    files = {str(p.relative_to(out)) for p in out.rglob("*")}
    assert files == {
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json",
        "1_Pooling", "1_Pooling/config.json", "2_Normalize", "sentence_bert_config.json",
        "config_sentence_transformers.json", "README.md",
    }  # no remote code  # fmt: skip
    linked, source = (out / "model.safetensors").stat(), (model_dir / "model.safetensors").stat()
    assert linked.st_ino == source.st_ino and linked.st_nlink == 2  # one copy on disk, bytes untouched
    assert (out / "tokenizer.json").stat().st_ino != (model_dir / "tokenizer.json").stat().st_ino

    pooling = json.loads((out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode"] == "mean" and pooling["word_embedding_dimension"] == 64  # sentence-transformers 6
    assert pooling["pooling_mode_mean_tokens"] is True and pooling["include_prompt"] is True  # legacy (5.x, vLLM)
    assert [key for key, value in pooling.items() if key.startswith("pooling_mode_") and value] == [
        "pooling_mode_mean_tokens"]
    loaded = Pooling.load(str(out / "1_Pooling"))  # sentence-transformers' own reader (6.x names it, 5.x derives it)
    assert (getattr(loaded, "pooling_mode", None) or loaded.get_pooling_mode_str()) == "mean"
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["sentence_transformers.models.Transformer",
                                            "sentence_transformers.models.Pooling",
                                            "sentence_transformers.models.Normalize"]
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 256
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == DEFAULT_QUERY_PROMPT


def test_readme_has_the_serve_commands_prompt_and_warning(exported):
    _, out = exported["llama"]
    readme = (out / "README.md").read_text()
    assert "vllm serve llama --runner pooling --dtype float32\n" in readme
    assert "vllm serve llama --runner pooling --dtype float32 --tensor-parallel-size 2\n" in readme
    assert f"QUERY_PROMPT = {json.dumps(DEFAULT_QUERY_PROMPT)}" in readme
    assert "Not for `transformers.AutoModel`" in readme and "is_causal: false" in readme


def test_sharded_weights_and_copy_across_filesystems(tmp_path, monkeypatch):
    model_dir = diffembed_folder(tmp_path / "model", max_shard_size="40KB")
    shards = sorted(p.name for p in model_dir.glob("model-*.safetensors"))
    assert len(shards) > 2
    out = export_vllm(model_dir, tmp_path / "out")
    for name in shards + ["model.safetensors.index.json"]:
        assert (out / name).stat().st_ino == (model_dir / name).stat().st_ino, name

    import diffembed_hf.export as export

    def cross_device(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(export.os, "link", cross_device)
    out = export_vllm(model_dir, tmp_path / "copied")
    for name in shards + ["model.safetensors.index.json"]:
        assert (out / name).stat().st_ino != (model_dir / name).stat().st_ino
        assert (out / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_bf16_weights_keep_their_dtype(tmp_path):
    model = tiny_model(1, **HEADS).to(torch.bfloat16)
    save_sentence_transformer(model, tokenizer(), tmp_path / "model", max_seq_length=256)
    out = export_vllm(tmp_path / "model", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "--dtype bfloat16" in (out / "README.md").read_text()


# ----------------------------------------------------------------------------------------------------------
# Refusals, atomicity, the CLI
# ----------------------------------------------------------------------------------------------------------


def edit_json(path: Path, **changes):
    """Set keys (a value of None removes the key)."""
    data = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({key: value for key, value in data.items() if value is not None}))


def add_dense(folder: Path):
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(modules))


REFUSALS = {
    # case: (model overrides, how to break the folder, regex the error must match)
    "causal ablation": ({"is_causal": True}, None, r"is_causal=true \(the causal-attention ablation\)"),
    "head size 16": ({"num_attention_heads": 4, "num_key_value_heads": 2}, None,
                     r"head size 16 is not supported by vLLM's attention kernels \(supported: 32, 64, 80, 96, 112, "
                     r"128, 160, 192, 224, 256, 512\)"),
    "scaled RoPE": ({}, lambda f: edit_json(f / "config.json", rope_scaling={"rope_type": "llama3", "factor": 8.0}),
                    r"scaled RoPE \(rope_type='llama3'\)"),
    "not DiffEmbed": ({}, lambda f: edit_json(f / "config.json", model_type="qwen2"),
                      r"model_type 'qwen2' is not 'diffembed'.*diffembed convert"),
    "no config": ({}, lambda f: (f / "config.json").unlink(), r"has no config\.json; pass a DiffEmbed model folder"),
    "last-token pooling": ({}, lambda f: edit_json(f / "1_Pooling" / "config.json", pooling_mode_mean_tokens=False,
                                                   pooling_mode_lasttoken=True, pooling_mode=None),  # legacy keys
                           r"pooling \['lasttoken'\]; the export supports mean pooling only"),
    "cls pooling (6.x key)": ({}, lambda f: edit_json(f / "1_Pooling" / "config.json", pooling_mode="cls"),
                              r"pooling \['cls'\]"),
    "prompt left out": ({}, lambda f: edit_json(f / "1_Pooling" / "config.json", include_prompt=False),
                        r"include_prompt=false"),
    "dense module": ({}, add_dense, r"modules \['Transformer', 'Pooling', 'Dense', 'Normalize'\]"),
    "gelu": ({"hidden_act": "gelu"}, None, r"hidden_act='gelu'; vLLM's Qwen2 and Llama MLPs support only silu"),
    "output bias only": ({"attention_bias": False, "attention_output_bias": True}, None,
                         r"output-projection bias without q/k/v biases"),
    "q/k/v and MLP biases": ({"attention_bias": True, "mlp_bias": True}, None, r"Qwen2Model, which has no MLP bias"),
    "q/k/v biases, head_dim apart": ({"head_dim": 64}, None, r"head_dim 64 != hidden_size / heads"),
    "no tokenizer": ({}, lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
                     r"has no tokenizer files"),
    "weights of another shape": ({}, lambda f: edit_json(f / "config.json", intermediate_size=80),
                                 r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape \[96, 64\], config\.json "
                                 r"implies \[80, 64\]"),
}


DAMAGED = {"no tokenizer", "weights of another shape"}  # a damaged folder: the same error in every command


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_clear_and_write_nothing(case, tmp_path):
    overrides, breaks, message = REFUSALS[case]
    model_dir = diffembed_folder(tmp_path / "model", **overrides)
    if breaks:
        breaks(model_dir)
    with pytest.raises(ModelFilesError if case in DAMAGED else ExportError, match=message):
        export_vllm(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_supported_head_sizes_pass(tmp_path):
    assert 32 in VLLM_HEAD_SIZES and 16 not in VLLM_HEAD_SIZES
    model_dir = diffembed_folder(tmp_path / "model", num_attention_heads=1, num_key_value_heads=1)  # head 64
    assert json.loads((export_vllm(model_dir, tmp_path / "out") / "config.json").read_text())["head_dim"] == 64


def test_lora_adapter_folder_is_named(tmp_path):
    """An adapter is exported merged into its base (test_trust); one whose base is not here is named."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ExportError, match="is a LoRA adapter whose base None is not a DiffEmbed folder here"):
        export_vllm(tmp_path / "adapter", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_existing_output_is_kept_unless_overwrite(exported, tmp_path):
    model_dir, _ = exported["qwen2"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match=r"already exists; pass overwrite=True \(--overwrite\)"):
        export_vllm(model_dir, out)
    assert (out / "keep.txt").read_text() == "old"
    export_vllm(model_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []
    with pytest.raises(ExportError, match="must not contain the model folder"):
        export_vllm(model_dir, model_dir.parent, overwrite=True)


def test_error_while_writing_leaves_nothing(exported, tmp_path, monkeypatch):
    """A failure after the weights are linked removes the temporary folder; an existing OUT survives intact."""
    import diffembed_hf.export as export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    model_dir, _ = exported["llama"]
    monkeypatch.setattr(export, "write_sentence_transformer_files", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_vllm(model_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="No space left"):
        export_vllm(model_dir, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_cli_export(exported, tmp_path, capsys):
    model_dir, _ = exported["llama"]
    assert cli_main(["export", "vllm", str(model_dir), str(tmp_path / "out")]) == 0
    assert "vLLM folder" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaModel"]
    assert cli_main(["export", "vllm", str(model_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffembed export vllm: error: ") and "already exists" in err and len(err.splitlines()) == 1
    assert cli_main(["export", "vllm", str(model_dir), str(tmp_path / "out"), "--overwrite"]) == 0
    with pytest.raises(SystemExit):
        cli_main(["export", str(model_dir), str(tmp_path / "out")])  # the engine is required


SLOW_EXPORT = textwrap.dedent(
    """
    import sys, time
    import diffembed_hf.export as export
    marker = sys.argv[3]
    real = export._link_or_copy

    def slow(*args):  # stands for a copy of many gigabytes across filesystems
        result = real(*args)
        open(marker, "w").close()
        time.sleep(120)
        return result

    export._link_or_copy = slow
    from diffembed_hf.cli import main
    sys.exit(main(["export", "vllm", sys.argv[1], sys.argv[2]]))
    """
)


def test_sigterm_leaves_nothing(exported, tmp_path):
    model_dir, _ = exported["qwen2"]
    marker, out = tmp_path / "copying", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(model_dir), str(out), str(marker)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the export ended before it could be stopped"
            time.sleep(0.01)
        assert list(tmp_path.glob(".out.tmp-*/model.safetensors"))  # stopped mid-way
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------
# vLLM's transformers backend asks for attn_implementation="vllm": refused with what to run instead
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["qwen2", "llama"])
def test_vllm_attention_is_refused_with_the_command_to_run(layout, exported):
    model_dir, _ = exported[layout]
    architecture = LAYOUTS[layout][1]
    with pytest.raises(ValueError) as error:
        DiffEmbedForEmbedding.from_pretrained(model_dir, attn_implementation="vllm")
    message = str(error.value)
    assert "attn_implementation='vllm'" in message and "diffembed export vllm" in message
    assert f"""--hf-overrides '{{"architectures": ["{architecture}"]}}'""" in message
    model = DiffEmbedForEmbedding.from_pretrained(model_dir, attn_implementation="sdpa")  # other paths unchanged
    assert model.config._attn_implementation == "sdpa"


@pytest.fixture(autouse=True)
def _no_vllm_import():
    yield
    assert "vllm" not in sys.modules
