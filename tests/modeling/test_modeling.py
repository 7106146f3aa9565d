"""The DiffEmbed model against transformers' own Qwen2Model / LlamaModel made bidirectional (written by others)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers.models import TINY, enable_checkpointing, randomize, tiny_config, tiny_model
from helpers.tensors import additive_mask, make_batch, real_positions
from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model

from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding

LAYOUTS = {"unpadded": ([7, 7, 7], "right"), "right": ([9, 3, 6, 1], "right"), "left": ([9, 3, 6, 1], "left")}


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def reference_states(ref_model, ids, mask):
    """transformers' model, bidirectional through an explicit 4-D additive mask, positions over real tokens."""
    with torch.no_grad():
        return ref_model(
            input_ids=ids, attention_mask=additive_mask(mask), position_ids=real_positions(mask)
        ).last_hidden_state


def our_states(model, ids, mask, attn=None):
    model.config._attn_implementation = attn
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("ref_attn", ["eager", "sdpa"])
@pytest.mark.parametrize("our_attn", [None, "eager", "sdpa"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parity_with_qwen2(layout, our_attn, ref_attn):
    ref = randomize(
        Qwen2Model(Qwen2Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                               attn_implementation=ref_attn))
    ).eval()
    ours = tiny_model()
    ours.model.load_state_dict(ref.state_dict())
    ids, mask = make_batch(*LAYOUTS[layout])
    real = mask.bool()
    out = our_states(ours, ids, mask, our_attn)
    assert_close(out.last_hidden_state[real], reference_states(ref, ids, mask)[real])


def test_parity_with_qwen2_config_is_causal_false():
    """Where transformers honours `config.is_causal = False` (>= 5.2), the plain padded call agrees too."""
    qcfg = Qwen2Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    qcfg.is_causal = False
    ref = randomize(Qwen2Model(qcfg)).eval()
    ids, mask = make_batch([8, 5, 2], "right")
    with torch.no_grad():
        plain = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    if not torch.allclose(plain[real], reference_states(ref, ids, mask)[real], atol=1e-5):
        pytest.skip("this transformers version ignores config.is_causal; the 4-D mask tests cover it")
    ours = tiny_model()
    ours.model.load_state_dict(ref.state_dict())
    assert_close(our_states(ours, ids, mask).last_hidden_state[real], plain[real])


@pytest.mark.parametrize("our_attn", [None, "eager", "sdpa"])
def test_parity_with_llama_without_bias(our_attn):
    lcfg = LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                       attention_bias=False, mlp_bias=False)
    ref = randomize(LlamaModel(lcfg)).eval()
    ours = randomize(DiffEmbedForEmbedding(tiny_config(attention_bias=False, rope_theta=500000.0))).eval()
    assert not any(name.endswith("bias") for name, _ in ours.named_parameters())
    ours.model.load_state_dict(ref.state_dict())
    ids, mask = make_batch([9, 4, 6], "left")
    real = mask.bool()
    assert_close(our_states(ours, ids, mask, our_attn).last_hidden_state[real], reference_states(ref, ids, mask)[real])


def test_embeddings_equal_sentence_transformers_mean_pooling_and_normalize():
    try:  # sentence-transformers >= 6 moved the modules; 5.x has them only here
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling

    ours = tiny_model()
    ids, mask = make_batch([9, 2, 5], "left")
    out = our_states(ours, ids, mask)
    features = {"token_embeddings": out.last_hidden_state, "attention_mask": mask}
    features = Normalize()(Pooling(TINY["hidden_size"], pooling_mode="mean")(features))
    assert_close(out.embeddings, features["sentence_embedding"])
    assert_close(out.embeddings.norm(dim=-1), torch.ones(3))


@pytest.mark.parametrize("attn", [None, "eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_invariance(attn, side):
    """A text alone and the same text among much longer ones give the same embedding."""
    ours = tiny_model()
    ids, mask = make_batch([5, 60, 37, 5], side, seed=3)
    short = ids[0, mask[0].bool()][None]
    alone = our_states(ours, short, torch.ones_like(short), attn).embeddings[0]
    batched = our_states(ours, ids, mask, attn).embeddings[0]
    assert_close(batched, alone)
    left_ids, left_mask = make_batch([5, 60, 37, 5], "left" if side == "right" else "right", seed=3)
    assert_close(our_states(ours, left_ids, left_mask, attn).embeddings, our_states(ours, ids, mask, attn).embeddings)


@pytest.mark.parametrize("attn", [None, "eager", "sdpa"])
def test_is_causal_controls_dependence_on_later_tokens(attn):
    ids, mask = make_batch([10, 10], "right", seed=4)
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 126 + 2
    for causal in (False, True):
        model = tiny_model(is_causal=causal)
        before = our_states(model, ids, mask, attn).last_hidden_state
        after = our_states(model, changed, mask, attn).last_hidden_state
        early_equal = torch.allclose(before[:, :7], after[:, :7], atol=1e-6)
        assert early_equal is causal
        assert not torch.allclose(before[:, 7:], after[:, 7:], atol=1e-6)


def test_causal_ablation_matches_standard_qwen2():
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    ref = randomize(Qwen2Model(Qwen2Config(**TINY, rope_parameters=rope))).eval()
    ours = tiny_model(is_causal=True)
    ours.model.load_state_dict(ref.state_dict())
    ids, mask = make_batch([8, 5, 3], "right")
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    for attn in (None, "eager", "sdpa"):
        assert_close(our_states(ours, ids, mask, attn).last_hidden_state[real], expected[real])


def test_config_accepts_plain_qwen2_dict():
    qwen = Qwen2Config(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 123456.0}).to_dict()
    cfg = DiffEmbedConfig(**qwen)
    assert cfg.model_type == "diffembed"
    for key, value in TINY.items():
        assert getattr(cfg, key) == value, key
    assert cfg.rope_theta == 123456.0 and cfg.attention_bias and not cfg.attention_output_bias
    assert cfg.head_dim == TINY["hidden_size"] // TINY["num_attention_heads"] and cfg.is_causal is False


@pytest.mark.parametrize(
    "overrides, error",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, NotImplementedError),
        ({"use_sliding_window": True, "sliding_window": 128}, NotImplementedError),
        ({"num_key_value_heads": 3}, ValueError),
        ({"pooling": "cls"}, ValueError),
    ],
)
def test_config_refuses_what_it_cannot_run(overrides, error):
    with pytest.raises(error):
        tiny_config(**overrides)


def test_save_and_reload_keeps_weights_and_rope(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    reloaded = DiffEmbedForEmbedding.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(tiny.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(reloaded.model.rotary_emb.inv_freq, tiny.model.rotary_emb.inv_freq)
    ids, mask = make_batch([6, 3], "right")
    assert torch.equal(our_states(tiny, ids, mask).embeddings, our_states(reloaded, ids, mask).embeddings)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys, json, torch
    sys.modules["diffembed_hf"] = None  # this process must not be able to import the package
    import transformers
    from transformers import AutoModel, AutoConfig
    folder, ids_path, out_path = sys.argv[1:4]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    batch = torch.load(ids_path)
    with torch.no_grad():
        out = model(input_ids=batch["ids"], attention_mask=batch["mask"])
    torch.save({"embeddings": out.embeddings, "module": type(model).__module__,
                "config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__module__,
                "version": transformers.__version__,
                "kernels": [name for name in sys.modules if name.endswith(".attention_kernels")]}, out_path)
    """
)


def run_remote_code(folder, ids, mask, tmp_path):
    """Load `folder` through AutoModel(trust_remote_code=True) in a fresh process without diffembed_hf."""
    torch.save({"ids": ids, "mask": mask}, tmp_path / "batch.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        check=True, env=env, cwd=tmp_path, timeout=300, stdin=subprocess.DEVNULL,
    )
    return torch.load(tmp_path / "out.pt")


def test_remote_code_round_trip_in_fresh_process(tmp_path, tiny):
    folder = tmp_path / "checkpoint"
    tiny.save_pretrained(folder)
    files = set(os.listdir(folder))
    assert {"config.json", "configuration_diffembed.py", "modeling_diffembed.py", "attention_kernels.py",
            "model.safetensors"} <= files
    assert "__init__.py" not in files
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_diffembed.DiffEmbedConfig",
        "AutoModel": "modeling_diffembed.DiffEmbedForEmbedding",
    }
    for name in ("configuration_diffembed.py", "modeling_diffembed.py", "attention_kernels.py"):
        source = (folder / name).read_text()
        assert "diffembed_hf" not in source.replace("`diffembed_hf.modeling`", "")
    ids, mask = make_batch([7, 2, 5], "left")
    result = run_remote_code(folder, ids, mask, tmp_path)
    assert result["module"].startswith("transformers_modules") and result["config"].startswith("transformers_modules")
    # the kernel choice is a second file beside the model: transformers copied it and imported the folder's copy
    assert [name.rsplit(".", 1)[0] for name in result["kernels"]] == [result["module"].rsplit(".", 1)[0]]
    assert torch.equal(result["embeddings"], our_states(tiny, ids, mask).embeddings)


def test_gradient_checkpointing_gives_same_gradients():
    ids, mask = make_batch([9, 4, 6], "left")

    def grads(checkpointing):
        model = tiny_model().train()
        if checkpointing:
            enable_checkpointing(model)
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        out = model(input_ids=ids, attention_mask=mask)
        (out.embeddings @ torch.arange(64.0)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)
    assert plain["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0


def test_lora_attaches_trains_and_merges():
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    lora_modules = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert lora_modules == set(targets)
    queries, qmask = make_batch([5, 6, 4, 7], "right", seed=10)
    docs, dmask = make_batch([8, 5, 9, 6], "right", seed=11)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(30):
        q = model(input_ids=queries, attention_mask=qmask).embeddings
        d = model(input_ids=docs, attention_mask=dmask).embeddings
        loss = torch.nn.functional.cross_entropy(q @ d.T * 20, torch.arange(4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=queries, attention_mask=qmask).embeddings
        merged = model.merge_and_unload()
        assert isinstance(merged, DiffEmbedForEmbedding)
        assert_close(merged(input_ids=queries, attention_mask=qmask).embeddings, adapted)


def test_bf16_within_bf16_tolerance_of_fp32():
    model = tiny_model()
    ids, mask = make_batch([12, 5, 30], "left")
    full = our_states(model, ids, mask).embeddings
    half = our_states(model.to(torch.bfloat16), ids, mask).embeddings
    assert half.dtype == torch.float32  # pooled and normalised in fp32 whatever the model dtype
    cosine = torch.nn.functional.cosine_similarity(full, half, dim=-1)
    assert cosine.min() > 0.99
    assert_close(half, full, rtol=5e-2, atol=5e-2)


def test_bad_inputs_have_clear_errors(tiny):
    ids, mask = make_batch([4, 3], "right")
    with pytest.raises(ValueError, match="vocab_size"):
        tiny(input_ids=torch.tensor([[3, 128]]))
    with pytest.raises(ValueError, match="vocab_size"):
        tiny(input_ids=torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        tiny(input_ids=torch.ones(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        tiny()
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        tiny(input_ids=ids[0])


def test_empty_batch_gives_an_empty_result(tiny):
    out = tiny(input_ids=torch.zeros(0, 5, dtype=torch.long))
    assert out.embeddings.shape == (0, 64)


@pytest.mark.parametrize("attn", [None, "eager", "sdpa"])
def test_empty_texts_get_a_zero_embedding_and_leave_the_others_alone(attn):
    """Documented behaviour: a text with no token (an empty string) embeds to zeros, never NaN."""
    model = tiny_model()
    ids, mask = make_batch([4, 1, 6], "left", seed=7)
    alone = our_states(model, ids[[0, 2]], mask[[0, 2]], attn).embeddings
    mask[1] = 0
    out = our_states(model, ids, mask, attn)
    assert torch.isfinite(out.last_hidden_state).all()
    assert torch.equal(out.embeddings[1], torch.zeros(64))
    assert_close(out.embeddings[[0, 2]], alone)
    # texts that all tokenized to nothing: a [batch, 0] input
    nothing = our_states(model, torch.zeros(2, 0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long), attn)
    assert torch.equal(nothing.embeddings, torch.zeros(2, 64))
    all_empty = our_states(model, ids, torch.zeros_like(mask), attn)
    assert torch.equal(all_empty.embeddings, torch.zeros(3, 64))


def test_attn_implementation_is_validated_and_visible(tmp_path, tiny):
    tiny.save_pretrained(tmp_path)
    assert DiffEmbedForEmbedding.from_pretrained(tmp_path).attention_backend == "packed_sdpa"
    assert DiffEmbedForEmbedding.from_pretrained(tmp_path, attn_implementation="sdpa").attention_backend == "sdpa"
    assert DiffEmbedForEmbedding.from_pretrained(tmp_path, attn_implementation="eager").attention_backend == "eager"
    with pytest.raises(ValueError, match="flex_attention"):
        DiffEmbedForEmbedding.from_pretrained(tmp_path, attn_implementation="flex_attention")
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken CUDA build raises OSError/RuntimeError, not only ImportError
        with pytest.raises(ImportError, match="flash-attn"):
            DiffEmbedForEmbedding.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
