"""The memory estimate: its counts against independent ones (transformers' and PEFT's parameter counts, autograd's
saved tensors), `--estimate` without loading weights, a verdict that names the setting to change, and training
refused before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.models import tiny_config

from diffembed_hf import DiffEmbedForEmbedding, load_dream_tokenizer
from diffembed_hf.cli import main
from diffembed_hf.errors import MemoryLimitError
from diffembed_hf.memory_estimate import (LORA_TARGETS, ModelShape, activation_bytes, inference_estimate,
                                          training_estimate)
from diffembed_hf.sentence_transformer import save_sentence_transformer

SHAPES = [dict(vocab_size=100, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2),
          dict(vocab_size=50, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=6, head_dim=16)]


@pytest.mark.parametrize("sizes", SHAPES)
def test_parameter_count_is_transformers_qwen2_count(sizes):
    """The count from config.json equals sum(numel) of transformers' own Qwen2Model of that config (an independent
    build of the same shapes: q/k/v biases, no o bias) and of the DiffEmbed model."""
    from transformers import Qwen2Config, Qwen2Model

    qwen = Qwen2Model(Qwen2Config(**sizes))
    ours = DiffEmbedForEmbedding(tiny_config(**sizes))
    shape = ModelShape.from_config(ours.config.to_dict())
    assert shape.parameters() == sum(p.numel() for p in qwen.parameters())
    assert shape.parameters() == sum(p.numel() for p in ours.parameters())


def test_parameter_count_follows_the_optional_biases():
    config = tiny_config(**SHAPES[0], attention_output_bias=True, mlp_bias=True)
    model = DiffEmbedForEmbedding(config)
    shape = ModelShape.from_config(config.to_dict())
    assert shape.parameters() == sum(p.numel() for p in model.parameters())
    assert shape.parameters() > ModelShape.from_config(tiny_config(**SHAPES[0]).to_dict()).parameters()  # control


@pytest.mark.parametrize("layers", [None, 1, 2])
def test_lora_count_is_pefts(layers):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2Model

    sizes = SHAPES[0]
    last = None if layers is None else list(range(sizes["num_hidden_layers"] - layers, sizes["num_hidden_layers"]))
    model = get_peft_model(Qwen2Model(Qwen2Config(**sizes)), LoraConfig(
        r=4, target_modules=list(LORA_TARGETS), layers_to_transform=last,
        layers_pattern=None if last is None else "layers"))
    trainable, _ = model.get_nb_trainable_parameters()
    assert ModelShape.from_config(sizes).lora_parameters(4, LORA_TARGETS, layers) == trainable


@pytest.mark.parametrize("lora, layers, autocast", [(False, None, False), (True, None, False), (True, 1, False),
                                                    (True, 1, True)])
def test_activations_match_the_tensors_autograd_keeps(lora, layers, autocast):
    """The activation count against the bytes autograd actually saves (saved-tensor hooks, parameters left out),
    for full fine-tuning, PEFT's LoRA on every layer and on the last one (the backward stops there), and LoRA under
    the CPU recipe's bf16 autocast over fp32 weights: within 10%, the embedding output and cos/sin being the rest."""
    torch.manual_seed(0)
    config = tiny_config(**SHAPES[0], max_position_embeddings=512)
    model = DiffEmbedForEmbedding(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        last = None if layers is None else [config.num_hidden_layers - 1]
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.05, target_modules=list(LORA_TARGETS),
                                                 layers_to_transform=last, layers_pattern=last and "layers"))
    model.train()
    tokens = 400
    ids = torch.randint(0, 100, (1, tokens))
    cu = torch.tensor([0, 100, 200, 300, 400], dtype=torch.int32)
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, cu_seq_lens_q=cu).embeddings.sum().backward()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(size for ptr, size in saved.items() if ptr not in parameters)
    estimate = activation_bytes(ModelShape.from_config(config.to_dict()), tokens, 2 if autocast else 4,
                                layers=layers, lora=lora, residual_bytes=4)
    assert 0.9 * measured <= estimate <= 1.1 * measured, (estimate, measured)
    if autocast:  # control: counting the residual stream in bf16 too misses by more than the tolerance
        low = activation_bytes(ModelShape.from_config(config.to_dict()), tokens, 2, layers=layers, lora=lora)
        assert low < 0.9 * measured


def test_checkpointing_lora_layers_and_batch_each_lower_the_training_peak():
    shape = ModelShape.from_config(SHAPES[0])
    settings = dict(batch_size=8, texts_per_row=3, max_seq_length=256, adapter_only=True)
    base = training_estimate(shape, **settings)
    assert training_estimate(shape, **settings, gradient_checkpointing=True).total < base.total
    assert training_estimate(shape, **settings, lora_layers=1).total < base.total
    assert training_estimate(shape, **{**settings, "batch_size": 4}).total < base.total
    full = training_estimate(shape, **settings, lora=False)
    params = shape.parameters()
    parts = {c.name: c.bytes for c in full.components}
    assert parts["gradients"] == 4 * params and parts["AdamW state"] == 8 * params  # fp32 full fine-tuning


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=151667, pad_token_id=151643, bos_token_id=151665, eos_token_id=151643)
    return save_sentence_transformer(DiffEmbedForEmbedding(config).eval(), load_dream_tokenizer(),
                                     tmp_path_factory.mktemp("m") / "m", max_seq_length=64)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"query": f"question {i}", "positive": f"answer {i}"}) + "\n"
                            for i in range(16)), encoding="utf-8")
    return path


def broken_copy(folder, tmp_path, how):
    import shutil

    copy = shutil.copytree(folder, tmp_path / "broken")
    weights = copy / "model.safetensors"
    if how == "absent":
        weights.unlink()
    else:
        weights.write_bytes(b"not a safetensors file")
    return copy


@pytest.mark.parametrize("how", ["absent", "corrupt"])
def test_encode_and_evaluate_estimate_without_the_weights(folder, tmp_path, capsys, how):
    """config.json is all the estimate reads: a folder whose weights are missing or damaged still estimates (and
    encoding it for real is refused, the control that the weights are unusable)."""
    broken = broken_copy(folder, tmp_path, how)
    expected = ModelShape.from_config(json.loads((folder / "config.json").read_text())).parameters() * 4
    for argv in (["encode", str(broken), "-o", str(tmp_path / "x.npy"), "--estimate", "--device", "cpu"],
                 ["evaluate", str(broken), "--output", str(tmp_path / "ev"), "--suite", "stdlib", "--estimate",
                  "--device", "cpu", "--device-memory", "80GiB"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "weights" in out and "activations" in out and "packed-attention workspace" in out
        weights_line = next(line for line in out.splitlines() if line.strip().startswith("weights"))
        assert f"{expected / 2**20:.2f} MiB" in weights_line
        assert "fits:" in out
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "ev").exists()
    (tmp_path / "in.txt").write_text("a text\n", encoding="utf-8")
    status = main(["encode", str(broken), "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "y.npy"),
                   "--device", "cpu"])
    assert status != 0 and "model.safetensors" in capsys.readouterr().err


def test_a_budget_that_does_not_fit_names_the_setting(folder, tmp_path, capsys):
    assert main(["encode", str(folder), "-o", str(tmp_path / "x.npy"), "--estimate", "--device", "cpu",
                 "--device-memory", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "(--device-memory)" in out and "--max-tokens-per-batch 8192" in out


def test_train_estimate_shows_both_checkpointing_choices_and_the_fix(folder, rows, tmp_path, capsys):
    argv = ["train", str(folder), str(rows), str(tmp_path / "out"), "--estimate", "--device", "cpu",
            "--max-seq-length", "64", "--batch-size", "4"]
    assert main(argv + ["--device-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits:" in out and "gradient checkpointing:" in out and "LoRA adapters" in out
    assert main(argv + ["--device-memory", "1MiB", "--no-gradient-checkpointing", "--full"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "--gradient-checkpointing" in out and "LoRA (drop --full)" in out
    assert not (tmp_path / "out").exists()


def test_train_refuses_before_loading(folder, rows, tmp_path, capsys, monkeypatch):
    """Settings that cannot fit are refused before the weights load, naming a setting; the same run with enough
    memory goes on to load (the control: the check is what stopped it)."""
    import diffembed_hf.train as train_module

    class Loaded(Exception):
        pass

    def no_load(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(train_module, "load_encoder", no_load)
    config = train_module.TrainingConfig(max_steps=1, batch_size=4, max_seq_length=64, eval_fraction=0.0,
                                         adapter_only=True)
    with pytest.raises(MemoryLimitError, match="lowers it: (--batch-size 2|--gradient-checkpointing|--gradcache 1)"):
        train_module.train(str(folder), str(rows), tmp_path / "out", config, device="cpu", device_memory="1MiB")
    with pytest.raises(Loaded):
        train_module.train(str(folder), str(rows), tmp_path / "out2", config, device="cpu", device_memory="80GiB")
    status = main(["train", str(folder), str(rows), str(tmp_path / "out3"), "--device", "cpu", "--max-steps", "1",
                   "--batch-size", "4", "--max-seq-length", "64", "--device-memory", "1MiB"])
    err = capsys.readouterr().err
    assert status == 2 and "diffembed train: error: training would need about" in err and "--adapter-only" in err
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_automatic_settings_never_refuse_a_run_that_fits(folder, rows, tmp_path, monkeypatch):
    """The check before loading counts a CPU's automatic length and checkpointing at their most favourable, so a
    memory that holds the weights and a short run passes, where the estimate at the model's full limit would not."""
    import diffembed_hf.train as train_module
    from diffembed_hf.device_settings import plan_training

    config = train_module.TrainingConfig(max_steps=1, batch_size=4, eval_fraction=0.0, adapter_only=True)
    shape = ModelShape.from_config(json.loads((folder / "config.json").read_text()))
    favourable = plan_training(shape, config, texts_per_row=2, device="cpu", favourable=True).total
    at_limit = plan_training(shape, dataclass_replace(config, gradient_checkpointing=False), texts_per_row=2,
                             device="cpu").total
    assert favourable < at_limit  # control: the two countings differ
    monkeypatch.setattr(train_module, "load_encoder", lambda *a, **k: (_ for _ in ()).throw(KeyError("loaded")))
    with pytest.raises(KeyError, match="loaded"):
        train_module.train(str(folder), str(rows), tmp_path / "out", config, device="cpu",
                           device_memory=(favourable + at_limit) // 2)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_inference_activations_scale_with_the_token_budget():
    shape = ModelShape.from_config(SHAPES[0])
    small, large = (inference_estimate(shape, max_tokens_per_batch=n) for n in (1024, 4096))
    weights = shape.parameters() * 4
    assert small.total - weights > 0 and large.total - weights == pytest.approx(4 * (small.total - weights), rel=1e-9)
