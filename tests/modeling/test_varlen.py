"""The packed (varlen) glue on CPU: unpad, cu_seqlens, positions, re-pad, packed input, and the kernel contracts."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_model
from helpers.tensors import make_batch, reference_varlen

from diffembed_hf.modeling import modeling_diffembed as mdl
from diffembed_hf.modeling import attention_kernels as kernels

CASES = {
    "mixed": ([17, 3, 40, 9, 1, 26], "right"),
    "mixed_left": ([17, 3, 40, 9, 1, 26], "left"),
    "batch_of_one": ([23], "right"),
    "length_one": ([1, 1, 4], "right"),
}


def padded_batch(case, seed):
    """The case's batch with two extra padding columns, so that every case has padding to remove
    (a tokenizer padding to a multiple of 8 does this to a batch of one)."""
    ids, mask = make_batch(*CASES[case], seed=seed)
    pad = torch.zeros(ids.shape[0], 2, dtype=torch.long)
    if CASES[case][1] == "left":
        return torch.cat([pad, ids], 1), torch.cat([pad, mask], 1)
    return torch.cat([ids, pad], 1), torch.cat([mask, pad], 1)


def run(model, attn, ids, mask=None, **kwargs):
    model.config._attn_implementation = attn
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs)


def pack(ids, mask):
    """What sentence-transformers 6 / transformers' DataCollatorWithFlattening send: one row, restarting positions."""
    rows = [row[m.bool()] for row, m in zip(ids, mask)]
    lengths = torch.tensor([len(r) for r in rows])
    cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
    return torch.cat(rows)[None], positions[None], cu, int(lengths.max())


@pytest.mark.parametrize("case", list(CASES))
def test_packed_cpu_path_equals_padded_sdpa(case):
    model = tiny_model()
    ids, mask = padded_batch(case, seed=5)
    assert model.attention_backend == "packed_sdpa"
    packed = run(model, None, ids, mask)
    padded = run(model, "sdpa", ids, mask)
    real = mask.bool()
    torch.testing.assert_close(packed.last_hidden_state[real], padded.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.embeddings, padded.embeddings, rtol=1e-5, atol=1e-5)
    # re-padding writes zeros, never stale values, at padded positions
    assert torch.count_nonzero(packed.last_hidden_state[~real]) == 0


@pytest.mark.parametrize("attn", [None, "sdpa", "eager"])
@pytest.mark.parametrize("case", ["mixed", "batch_of_one", "length_one"])
def test_already_packed_input_equals_padded(case, attn):
    model = tiny_model()
    ids, mask = make_batch(*CASES[case], seed=6)
    flat_ids, positions, cu, longest = pack(ids, mask)
    padded = run(model, "sdpa", ids, mask)
    for position_ids in (positions, None):  # positions are derived from cu_seq_lens when not given
        packed = run(model, attn, flat_ids, None, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                     max_length_q=longest, max_length_k=longest)
        assert packed.last_hidden_state.shape == (1, flat_ids.shape[1], 64)
        torch.testing.assert_close(packed.last_hidden_state[0], padded.last_hidden_state[mask.bool()], rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(packed.embeddings, padded.embeddings, rtol=1e-5, atol=1e-5)


def test_packed_input_from_transformers_flattening_collator():
    from transformers import DataCollatorWithFlattening

    model = tiny_model()
    ids, mask = make_batch([7, 2, 11], "right", seed=8)
    features = [{"input_ids": row[m.bool()].tolist()} for row, m in zip(ids, mask)]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)(features)
    batch.pop("labels", None)
    assert batch["cu_seq_lens_q"].tolist() == [0, 7, 9, 20]
    packed = run(model, None, batch.pop("input_ids"), **batch)
    torch.testing.assert_close(packed.embeddings, run(model, "sdpa", ids, mask).embeddings, rtol=1e-5, atol=1e-5)


def test_packed_input_is_validated():
    model = tiny_model()
    ids, mask = make_batch([4, 3], "right")
    flat_ids, positions, cu, longest = pack(ids, mask)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        run(model, None, flat_ids, position_ids=positions, cu_seq_lens_q=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="batch size 1"):
        run(model, None, ids, cu_seq_lens_q=cu)


def test_model_flags_let_sentence_transformers_flatten():
    model = tiny_model()
    assert model.is_backend_compatible()
    assert model._supports_attention_backend


# ---- the kernel contracts, checked without a GPU ------------------------------------------------------------


class FakeFlashAttn:
    """Stands in for `flash_attn.flash_attn_varlen_func` and asserts its documented contract
    (flash_attn_interface.py, v2.x): q [total_q, nheads, d], k/v [total_k, nheads_k, d] with nheads % nheads_k == 0
    (grouped heads are native, never pre-repeated), int32 cu_seqlens of length batch+1, int max_seqlen."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                 softmax_scale=None, causal=False, window_size=(-1, -1), **unused):
        assert q.dim() == k.dim() == v.dim() == 3 and q.shape[-1] == k.shape[-1] == v.shape[-1]
        assert q.shape[1] % k.shape[1] == 0 and k.shape[1] < q.shape[1], "GQA kv heads must be passed unrepeated"
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and int(cu_seqlens_q[-1]) == q.shape[0]
        assert isinstance(max_seqlen_q, int) and max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        assert dropout_p == 0.0 and softmax_scale == pytest.approx(q.shape[-1] ** -0.5)
        self.calls.append(causal)
        return reference_varlen(q, k, v, cu_seqlens_q, softmax_scale, causal)


def force_backend(monkeypatch, backend, gqa_mode):
    monkeypatch.setattr(mdl, "select_backend", lambda config, device, dtype: backend)
    monkeypatch.setattr(mdl, "probe_kernel", lambda *args: gqa_mode)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_call_follows_its_contract(monkeypatch, causal):
    fake = FakeFlashAttn()
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", fake)
    force_backend(monkeypatch, "flash_attn_varlen", "native")
    model = tiny_model(is_causal=causal)
    ids, mask = make_batch([17, 3, 40, 1], "left", seed=9)
    varlen = run(model, None, ids, mask)
    assert fake.calls == [causal] * model.config.num_hidden_layers
    padded = run(model, "sdpa", ids, mask)
    real = mask.bool()
    torch.testing.assert_close(varlen.last_hidden_state[real], padded.last_hidden_state[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(varlen.embeddings, padded.embeddings, rtol=1e-5, atol=1e-5)


def make_fake_torch_varlen(style, calls):
    """Fakes of `torch.nn.attention.varlen.varlen_attn` with the signature of torch 2.10 (`is_causal`),
    2.11 (`window_size`, no `enable_gqa`) and 2.12+ (`window_size`, `enable_gqa`)."""

    def check(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, gqa):
        assert cu_q.dtype == torch.int32 and isinstance(max_q, int) and scale == pytest.approx(q.shape[-1] ** -0.5)
        if k.shape[1] != q.shape[1] and not gqa:
            raise RuntimeError("number of heads in key/value must equal query")  # what 2.11 does without GQA
        calls.append((causal, k.shape[1]))
        return reference_varlen(q, k, v, cu_q, scale, causal)

    if style == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None,
                        scale=None):
            return check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, is_causal, False)
    elif style == "2.11":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            return check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size == (-1, 0), False)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False):
            return check(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, window_size == (-1, 0),
                         enable_gqa)
    return varlen_attn


@pytest.mark.parametrize("style, gqa_mode", [("2.10", "repeat"), ("2.11", "repeat"), ("2.13", "enable_gqa")])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_varlen_call_adapts_to_each_signature(monkeypatch, style, gqa_mode, causal):
    calls = []
    monkeypatch.setattr(kernels, "varlen_attn", make_fake_torch_varlen(style, calls))
    force_backend(monkeypatch, "torch_varlen", gqa_mode)
    model = tiny_model(is_causal=causal)
    ids, mask = make_batch([12, 5, 30], "right", seed=12)
    varlen = run(model, None, ids, mask)
    expected_kv_heads = 4 if gqa_mode == "repeat" else 2
    assert calls == [(causal, expected_kv_heads)] * model.config.num_hidden_layers
    torch.testing.assert_close(varlen.embeddings, run(model, "sdpa", ids, mask).embeddings, rtol=1e-5, atol=1e-5)


def test_kernel_probe_finds_the_gqa_mode_a_kernel_accepts(monkeypatch):
    """The probe tries native GQA, then enable_gqa, then repeated kv heads; a kernel that always raises is unusable."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "varlen_attn", make_fake_torch_varlen("2.11", []))
    assert kernels._working_gqa_mode("torch_varlen", 4, 2, 16, cpu, torch.float32) == "repeat"
    assert kernels._working_gqa_mode("torch_varlen", 4, 4, 16, cpu, torch.float32) == "native"
    monkeypatch.setattr(kernels, "varlen_attn", make_fake_torch_varlen("2.13", []))
    assert kernels._working_gqa_mode("torch_varlen", 4, 2, 16, cpu, torch.float32) == "enable_gqa"
    monkeypatch.setattr(kernels, "flash_attn_varlen_func", FakeFlashAttn())
    assert kernels._working_gqa_mode("flash_attn_varlen", 4, 2, 16, cpu, torch.float32) == "native"

    def broken(*args, **kwargs):
        raise RuntimeError("look-alike build: varlen not implemented")

    monkeypatch.setattr(kernels, "flash_attn_varlen_func", broken)
    assert kernels._working_gqa_mode("flash_attn_varlen", 4, 2, 16, cpu, torch.float32) is None
    # kernels only run on CUDA in half precision: anything else is refused before any call
    assert kernels.probe_kernel("torch_varlen", cpu, torch.bfloat16, 4, 2, 16) is None


def test_signature_inspection_matches_installed_torch():
    """The installed torch's varlen_attn (if any) has one of the signatures the fakes above model."""
    if kernels.varlen_attn is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    params = inspect.signature(kernels.varlen_attn).parameters
    assert {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale"} <= set(params)
    assert "window_size" in params or "is_causal" in params
