"""The self-verifying kernel probe and the FlashAttention-4 call contract, checked on CPU with fake kernels.

The hardware gate (CUDA, half precision, Hopper for FlashAttention-4) is `_kernel_may_run`; the comparison with
SDPA is `_working_gqa_mode`, which runs on any device, so these tests drive it in fp32 on the CPU.
"""

import importlib.util
import logging
import sys
import types

import pytest
import torch
from helpers.models import enable_checkpointing, tiny_model
from helpers.tensors import make_batch
from helpers.tensors import reference_varlen as per_segment_sdpa  # a correct varlen kernel: SDPA per text

from diffembed_hf.modeling import modeling_diffembed as mdl
from diffembed_hf.modeling import attention_kernels as kernels

CPU = torch.device("cpu")
HEADS = (4, 2, 16)  # q heads, kv heads, head_dim


def flash_style(attend):
    """A kernel with flash-attn 2's positional signature around `attend(q, k, v, cu, scale, causal)`."""

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False, **unused):
        return attend(q, k, v, cu_q, softmax_scale, causal)

    return kernel


def correct(q, k, v, cu, scale, causal):
    return per_segment_sdpa(q, k, v, cu, scale, causal)


def ignores_boundaries(q, k, v, cu, scale, causal):
    """A plausible broken build: attends across the whole packed batch."""
    whole = torch.tensor([0, q.shape[0]], dtype=torch.int32)
    return per_segment_sdpa(q, k, v, whole, scale, causal)


def wrong_scale(q, k, v, cu, scale, causal):
    return per_segment_sdpa(q, k, v, cu, 1.0, causal)


def raises(q, k, v, cu, scale, causal):
    raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")


def modulo_heads(q, k, v, cu, scale, causal):
    """Maps q head i to kv head i % kv_heads (wrong for grouped heads, right once kv heads are repeated)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat(1, groups, 1), v.repeat(1, groups, 1)
    return per_segment_sdpa(q, k, v, cu, scale, causal)


class _WrongGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu, scale, causal):
        ctx.save_for_backward(q, k, v)
        return per_segment_sdpa(q, k, v, cu, scale, causal)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        return grad, torch.zeros_like(k), torch.zeros_like(v), None, None, None  # dq is not the gradient


def wrong_gradient(q, k, v, cu, scale, causal):
    return _WrongGradient.apply(q, k, v, cu, scale, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_probe_accepts_a_correct_kernel_and_rejects_wrong_or_failing_ones(monkeypatch, caplog, causal):
    verdicts = {}
    for label, attend in [("correct", correct), ("boundaries", ignores_boundaries), ("scale", wrong_scale),
                          ("raises", raises), ("gradient", wrong_gradient)]:
        monkeypatch.setattr(kernels, "flash_attn_varlen_func", flash_style(attend))
        with caplog.at_level(logging.INFO, logger=kernels.logger.name):
            caplog.clear()
            verdicts[label] = kernels._working_gqa_mode("flash_attn_varlen", *HEADS, CPU, torch.float32, causal)
            if label in ("boundaries", "scale", "gradient"):
                assert "disagrees with SDPA" in caplog.text
            if label == "raises":
                assert "cannot run here" in caplog.text and "Ampere" in caplog.text
    assert verdicts == {"correct": "native", "boundaries": None, "scale": None, "raises": None, "gradient": None}


class _SavesForBackward(torch.autograd.Function):
    """A correct kernel that, like flash-attn, saves its inputs (cu_seqlens included) for the backward pass."""

    @staticmethod
    def forward(ctx, q, k, v, cu, scale, causal):
        ctx.save_for_backward(q, k, v, cu)
        ctx.scale, ctx.causal = scale, causal
        return per_segment_sdpa(q, k, v, cu, scale, causal)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, cu = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_() for x in (q, k, v)]
            out = per_segment_sdpa(*inputs, cu, ctx.scale, ctx.causal)
        return (*torch.autograd.grad(out, inputs, grad), None, None, None)


def test_probe_accepts_a_correct_kernel_when_first_called_under_inference_mode(monkeypatch):
    """Encoding runs under torch.inference_mode(); the probe's own tensors must still be savable for backward,
    or every kernel is rejected (and the verdict cached for the process)."""
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", flash_style(_SavesForBackward.apply))
    with torch.inference_mode():
        assert kernels._working_gqa_mode("flash_attn_varlen", *HEADS, CPU, torch.float32) == "native"


def test_probe_falls_back_to_repeated_kv_heads_when_native_grouping_is_wrong(monkeypatch):
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", flash_style(modulo_heads))
    assert kernels._working_gqa_mode("flash_attn_varlen", *HEADS, CPU, torch.float32) == "repeat"
    # control: without grouped heads the same kernel is right natively
    assert kernels._working_gqa_mode("flash_attn_varlen", 4, 4, 16, CPU, torch.float32) == "native"


def torch_varlen_style(attend):
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        return attend(query, key, value, cu_seq_q, scale, window_size == (-1, 0))

    return varlen_attn


def fa4_style(attend, calls=None):
    def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, softmax_scale=None, causal=False, **unused):
        return attend(q, k, v, cu_seqlens_q, softmax_scale, causal), None

    return flash_attn_varlen_func


@pytest.mark.parametrize("name, attr, wrap", [("torch_varlen", "varlen_attn", torch_varlen_style),
                                              ("flash_attn_4", "flash_attn_4_varlen_func", fa4_style)])
def test_probe_judges_every_kernel_kind(monkeypatch, name, attr, wrap):
    verdicts = {}
    for label, attend in [("correct", correct), ("boundaries", ignores_boundaries), ("raises", raises)]:
        monkeypatch.setattr(kernels, attr, wrap(attend))
        verdicts[label] = kernels._working_gqa_mode(name, *HEADS, CPU, torch.float32)
    assert verdicts == {"correct": "native", "boundaries": None, "raises": None}


def test_probe_tolerance_suits_half_precision():
    """A kernel that only rounds its output to bf16 passes the bf16 tolerance; the fp32 one would reject it."""
    torch.manual_seed(0)
    q, k, v = torch.randn(20, 4, 16), torch.randn(20, 2, 16), torch.randn(20, 2, 16)
    cu = torch.tensor([0, 5, 6, 18, 20], dtype=torch.int32)
    exact = per_segment_sdpa(q, k, v, cu, 0.25, False)
    rounded = exact.to(torch.bfloat16).float()
    error = kernels._token_relative_error(rounded, exact)
    assert error <= kernels._PROBE_TOLERANCE[torch.bfloat16][0]
    assert error > kernels._PROBE_TOLERANCE[torch.float32][0]
    leaked = per_segment_sdpa(q, k, v, torch.tensor([0, 20], dtype=torch.int32), 0.25, False)
    assert kernels._token_relative_error(leaked, exact) > 5 * kernels._PROBE_TOLERANCE[torch.bfloat16][0]
    assert kernels._token_relative_error(exact * float("nan"), exact) == float("inf")


def test_hardware_gate(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(kernels, "flash_attn_4_varlen_func", fa4_style(correct))
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not kernels._kernel_may_run("flash_attn_4", cuda, torch.bfloat16)  # Ampere: FlashAttention-4 not tried
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernels._kernel_may_run("flash_attn_4", cuda, torch.bfloat16)
    assert not kernels._kernel_may_run("flash_attn_4", cuda, torch.float32)
    assert not kernels._kernel_may_run("flash_attn_4", CPU, torch.bfloat16)
    assert not kernels._kernel_may_run("flash_attn_varlen", cuda, torch.bfloat16)  # not installed


def test_probe_is_gated_then_cached(monkeypatch):
    calls = []

    def counting(q, k, v, cu, scale, causal):
        calls.append(1)
        return correct(q, k, v, cu, scale, causal)

    monkeypatch.setattr(kernels, "_kernel_probe_cache", {})
    monkeypatch.setattr(kernels, "flash_attn_4_varlen_func", fa4_style(counting))
    assert kernels.probe_kernel("flash_attn_4", CPU, torch.float32, *HEADS) is None  # gate: CPU never runs it
    assert calls == []
    monkeypatch.setattr(kernels, "_kernel_may_run", lambda name, device, dtype: True)
    monkeypatch.setattr(kernels, "_kernel_probe_cache", {})
    assert kernels.probe_kernel("flash_attn_4", CPU, torch.float32, *HEADS) == "native"
    assert kernels.probe_kernel("flash_attn_4", CPU, torch.float32, *HEADS) == "native"
    assert len(calls) == 1  # probed once, then cached


@pytest.mark.parametrize("working, expected", [
    ({"flash_attn_4", "flash_attn_varlen", "torch_varlen"}, "flash_attn_4"),
    ({"flash_attn_varlen", "torch_varlen"}, "flash_attn_varlen"),
    ({"torch_varlen"}, "torch_varlen"),
    (set(), "sdpa"),
])
def test_automatic_choice_order(monkeypatch, working, expected):
    probed = []

    def probe(name, device, dtype, *heads):
        probed.append(name)
        return "native" if name in working else None

    monkeypatch.setattr(kernels, "probe_kernel", probe)
    config = tiny_model().config
    config._attn_implementation = None
    assert kernels.select_backend(config, torch.device("cuda"), torch.bfloat16) == expected
    order = ["flash_attn_4", "flash_attn_varlen", "torch_varlen"]
    assert probed == order[: order.index(expected) + 1] if expected != "sdpa" else probed == order
    assert kernels.select_backend(config, CPU, torch.float32) == "packed_sdpa"


# ---- the FlashAttention-4 call contract -----------------------------------------------------------------


class FakeFlashAttn4:
    """`flash_attn.cute.flash_attn_varlen_func` as flash-attn-4 4.0.0b36 defines it (interface.py): q, k, v,
    then `qv` as the fourth positional parameter, so cu_seqlens must be keywords; int32 cu_seqlens of length
    batch + 1; int max_seqlen; kv heads native (nheads % nheads_k == 0). Returns `(out, lse)` with lse
    `[nheads, total_q]`, or the tensor alone as earlier betas did."""

    def __init__(self, returns_tuple):
        self.returns_tuple = returns_tuple
        self.calls = []

    def __call__(self, q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                 min_seqlen_k=None, seqused_q=None, seqused_k=None, gather_kv_indices=None, page_table=None,
                 softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None, softcap=0.0,
                 num_splits=1, pack_gqa=None, deterministic=False, return_lse=False, **rest):
        assert qv is None and seqused_q is None and seqused_k is None and page_table is None and not rest
        assert q.dim() == k.dim() == v.dim() == 3 and q.shape[1] % k.shape[1] == 0
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert cu_seqlens_q.shape == (cu_seqlens_q.numel(),) and int(cu_seqlens_q[-1]) == q.shape[0]
        assert torch.equal(cu_seqlens_q, cu_seqlens_k)
        lengths = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
        assert isinstance(max_seqlen_q, int) and max_seqlen_q == max_seqlen_k == int(lengths.max())
        assert softmax_scale == pytest.approx(q.shape[-1] ** -0.5) and window_size == (None, None)
        self.calls.append((causal, k.shape[1]))
        out = per_segment_sdpa(q, k, v, cu_seqlens_q, softmax_scale, causal)
        lse = torch.zeros(q.shape[1], q.shape[0])
        return (out, lse) if self.returns_tuple else out


def force_backend(monkeypatch, backend, gqa_mode):
    monkeypatch.setattr(mdl, "select_backend", lambda config, device, dtype: backend)
    monkeypatch.setattr(mdl, "probe_kernel", lambda *args: gqa_mode)


@pytest.mark.parametrize("returns_tuple", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_4_gets_its_documented_arguments(monkeypatch, returns_tuple, causal):
    fake = FakeFlashAttn4(returns_tuple)
    monkeypatch.setattr(kernels, "flash_attn_4_varlen_func", fake)
    assert kernels._working_gqa_mode("flash_attn_4", *HEADS, CPU, torch.float32, causal) == "native"
    fake.calls.clear()
    force_backend(monkeypatch, "flash_attn_4", "native")
    model = tiny_model(is_causal=causal)
    ids, mask = make_batch([17, 3, 40, 1], "left", seed=9)
    model.config._attn_implementation = None
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask)
    assert fake.calls == [(causal, 2)] * model.config.num_hidden_layers  # grouped kv heads passed unrepeated
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(packed.embeddings, padded.embeddings, rtol=1e-5, atol=1e-5)


def test_flash_attn_4_path_trains_like_sdpa(monkeypatch):
    """Forward and backward through the packed FlashAttention-4 path give SDPA's gradients."""
    fake = FakeFlashAttn4(returns_tuple=True)
    monkeypatch.setattr(kernels, "flash_attn_4_varlen_func", fake)
    ids, mask = make_batch([12, 5, 30], "right", seed=3)
    grads = {}
    for attn in ("flash_attn_4", "sdpa"):
        monkeypatch.setattr(mdl, "select_backend", lambda config, device, dtype, attn=attn: attn)
        monkeypatch.setattr(mdl, "probe_kernel", lambda *args: "native")
        model = tiny_model().train()
        enable_checkpointing(model)
        out = model(input_ids=ids, attention_mask=mask).embeddings
        (out @ torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads[attn] = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    assert len(fake.calls) == 2 * 2  # 2 layers, each run again by gradient checkpointing in the backward
    torch.testing.assert_close(grads["flash_attn_4"], grads["sdpa"], rtol=1e-4, atol=1e-6)
    assert grads["sdpa"].abs().max() > 0


def test_flash_attn_4_is_imported_from_flash_attn_cute(monkeypatch):
    """With only flash-attn-4 installed (a `flash_attn` namespace holding `cute`), FlashAttention-4 is found
    and flash-attn 2 is not mistaken for present."""
    fake = FakeFlashAttn4(returns_tuple=True)
    package = types.ModuleType("flash_attn")
    package.__path__ = []
    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = fake
    package.cute = cute
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    name = "diffembed_hf.modeling._fa4_import_check"
    spec = importlib.util.spec_from_file_location(name, kernels.__file__)
    copy = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, copy)
    spec.loader.exec_module(copy)
    assert copy.flash_attn_4_varlen_func is fake
    assert copy.flash_attn_varlen_func is None
    assert kernels.flash_attn_4_varlen_func is None  # the real environment: not installed
