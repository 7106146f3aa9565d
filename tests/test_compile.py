"""The forward without host syncs, compiled whole: `torch.compile(model, fullgraph=True)` traces packed
(`cu_seq_lens_q`) and padded input as one graph each and gives eager's vectors; batches of other lengths reuse
the graph (dynamic shapes); `load_encoder(compile=True)` and `diffembed encode --compile` use it. The checks
that left the forward (they stalled the device) are made on the host where inputs and outputs are built: the
encoder checks ids before the copy and every vector on its host copy; the model keeps them behind
`set_debug_checks`. The kernel self-test runs at load and after `.to()`, never in a forward.

Compiled vectors are compared with the eager model, whose padded/packed paths are checked against transformers'
Qwen2 in test_modeling/test_varlen. Most tests compile with `aot_eager` (dynamo's trace plus AOT autograd, no C++
build: seconds); the inductor test is `slow` (minutes of C++ compilation on two shared cores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.corpus import MODEL
from helpers.models import tiny_model
from helpers.tensors import make_batch
from torch._dynamo.testing import CompileCounterWithBackend

import diffembed_hf.modeling.modeling_diffembed as mdl
import diffembed_hf.modeling.attention_kernels as kernels
from diffembed_hf.packed_encoder import PackedEncoder
from diffembed_hf.cli import main
from diffembed_hf.encoding import backbone, encode, load_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def packed(lengths, seed=0, vocab=128):
    """A packed batch as the encoder sends it: `[1, total]` ids, host `cu_seq_lens_q`, `max_length_q` an int."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (1, sum(lengths)), generator=gen)
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return dict(input_ids=ids, cu_seq_lens_q=cu, max_length_q=max(lengths))


def padded(lengths, seed=0):
    ids, mask = make_batch(lengths, "left", seed=seed)
    return dict(input_ids=ids, attention_mask=mask)


def graphs(counter: CompileCounterWithBackend) -> int:
    """Graphs dynamo compiled from the model (aot_eager also hands the counter an empty graph of its own)."""
    return sum(1 for graph in counter.graphs if len(graph.graph.nodes))


@pytest.mark.parametrize("make", [packed, padded], ids=["packed", "padded"])
def test_forward_is_one_graph_without_breaks(make):
    model = tiny_model()
    with torch.inference_mode():
        explanation = torch._dynamo.explain(model)(**make([9, 3, 14]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("make", [packed, padded], ids=["packed", "padded"])
def test_compiled_vectors_equal_eager_and_later_batches_reuse_the_graph(make):
    model = tiny_model()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    results = []
    with torch.inference_mode():
        for seed, lengths in enumerate(([9, 3, 14], [5, 21], [2, 7, 11, 30])):  # other counts and lengths
            batch = make(lengths, seed=seed)
            got, expected = compiled(**batch).embeddings, model(**batch).embeddings
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
            results.append(got)
    assert graphs(counter) == 1  # no recompilation for new lengths, text counts or longest texts
    assert (results[0][:2] - results[1]).abs().max() > 1e-2  # control: other input, other vectors


def test_packed_and_padded_compiled_agree_with_each_other():
    """The two compiled paths (re-padded packed attention, masked padded attention) give one text one vector."""
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    lengths = [9, 3, 14]
    batch = padded(lengths, seed=4)
    mask = batch["attention_mask"].bool()
    ids = batch["input_ids"][mask][None]  # the same texts, packed
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    with torch.inference_mode():
        from_padded = compiled(**batch).embeddings
        from_packed = compiled(input_ids=ids, cu_seq_lens_q=cu, max_length_q=max(lengths)).embeddings
    torch.testing.assert_close(from_packed, from_padded, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_vectors_equal_eager():
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.inference_mode():
        for batch in (packed([9, 3, 14]), padded([9, 3, 14]), packed([5, 21], seed=1)):
            torch.testing.assert_close(compiled(**batch).embeddings, model(**batch).embeddings, rtol=0, atol=1e-5)


def test_compiled_bad_ids_are_named():
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    batch = packed([4, 3])
    with torch.inference_mode():
        compiled(**batch)
        batch["input_ids"][0, 2] = 128
        with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, 128\)"):
            compiled(**batch)


def test_compiled_packed_input_needs_max_length_q():
    compiled = torch.compile(tiny_model(), fullgraph=True, backend="aot_eager")
    batch = packed([4, 3])
    del batch["max_length_q"]
    with pytest.raises(Exception, match="max_length_q"):
        compiled(**batch)


# ---- the checks made outside the forward -------------------------------------------------------------------


def overflowing_fp16(model):
    """Value vectors of ~1000 summed by a large output projection: far beyond float16's 65504."""
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.bias.fill_(1000.0)
        model.model.layers[0].self_attn.o_proj.weight.fill_(100.0)
    return model


def test_non_finite_embeddings_are_named_by_an_eager_cpu_forward_and_by_debug_checks_under_compile():
    model = overflowing_fp16(tiny_model().to(torch.float16))
    batch = padded([6, 4])
    with torch.no_grad():
        # eager on a CPU: the check reads host memory, no stream to block, so it stays on (sentence-transformers'
        # own encode and direct AutoModel calls get the error too)
        with pytest.raises(FloatingPointError, match=r"rows \[0, 1\].*bfloat16"):
            model(**batch)
        assert torch.isfinite(model.float()(**batch).embeddings).all()  # control: float32 does not overflow
        # compiled, the check is off unless asked for: the NaN comes back without a host read ...
        half = model.half()
        compiled = torch.compile(half, fullgraph=True, backend="aot_eager")
        assert not torch.isfinite(compiled(**batch).embeddings).all()
        # ... and with debug checks an asynchronous assert carries the same wording
        half.set_debug_checks(True)
        torch._dynamo.reset()
        with pytest.raises(RuntimeError, match="Non-finite embeddings"):
            torch.compile(half, fullgraph=True, backend="aot_eager")(**batch)
        half.set_debug_checks(False)


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders(**MODEL)


def test_encoder_checks_ids_on_the_host_before_the_copy(folder):
    encoder = PackedEncoder(load_encoder(str(folder), device="cpu"))
    vocab = encoder.vocab_size
    assert encoder.embed_ids([[5, 6], [vocab - 1]]).shape == (2, encoder.dim)  # control: the edge id is fine
    with pytest.raises(ValueError, match=rf"must lie in \[0, {vocab}\).*\[5, {vocab + 3}\]"):
        encoder.embed_ids([[5, 6], [7, vocab + 3]])


def test_encoder_names_non_finite_vectors_on_its_host_copy(folder, monkeypatch):
    model = load_encoder(str(folder), device="cpu", dtype=torch.float16)
    overflowing_fp16(backbone(model))
    assert not backbone(model).debug_checks
    # As on an accelerator, where the forward leaves the check to the encoder: the error below is the encoder's.
    monkeypatch.setattr(mdl, "_check_finite", lambda *args: None)
    with pytest.raises(FloatingPointError, match=r"rows \[0, 1\].*float16.*bfloat16"):
        encode(model, ["a few words", "more words here"])


# ---- the kernel self-test: at load and after .to(), not in a forward -------------------------------------


def test_kernel_self_test_runs_on_to_and_load_not_in_the_forward(monkeypatch, tmp_path):
    probed = []
    monkeypatch.setattr(mdl, "probe_kernel", lambda name, device, dtype, *heads: probed.append((name, dtype)))
    model = tiny_model()
    model.save_pretrained(tmp_path)
    probed.clear()
    model.to(torch.float64)
    assert sorted(probed) == sorted((name, torch.float64) for name in kernels.VARLEN_KERNELS * 2)  # outer and inner
    probed.clear()
    type(model).from_pretrained(tmp_path)
    assert {name for name, _ in probed} == set(kernels.VARLEN_KERNELS)
    probed.clear()
    with torch.no_grad():
        model(**padded([5, 3]))
        model(**packed([5, 3]))
    assert probed == []


# ---- load_encoder(compile=True) and --compile ----------------------------------------------------------------


@pytest.fixture
def counted_compile(monkeypatch):
    """`nn.Module.compile` with a counting aot_eager backend: the options the package passes, no C++ build."""
    counter = CompileCounterWithBackend("aot_eager")
    options = []
    original = torch.nn.Module.compile

    def compile_(self, **kwargs):
        options.append(kwargs)
        original(self, backend=counter, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_)
    return counter, options


WORDS = "river stone cloud garden lamp orange winter music paper bridge".split()
TEXTS = [" ".join(WORDS[i % 10:i % 10 + n]) for i, n in enumerate((1, 2, 3, 5, 7, 2, 4, 6, 1, 3, 8, 2))]


def test_load_encoder_compile_encodes_like_eager_in_batches_of_other_lengths(folder, counted_compile):
    counter, options = counted_compile
    eager = encode(load_encoder(str(folder), device="cpu"), TEXTS, max_tokens_per_batch=12)
    model = load_encoder(str(folder), device="cpu", compile=True)
    assert options == [{"fullgraph": True, "dynamic": True}]
    encoder = PackedEncoder(model, max_tokens_per_batch=12)
    batches = encoder.batches([len(row) for row in encoder.tokenize(TEXTS)[0]])
    assert len(batches) >= 3 and sum(len(batch) > 1 for batch in batches) >= 2, batches
    compiled = encode(model, TEXTS, max_tokens_per_batch=12)  # several batches, each of other lengths
    # at most one graph for batches of one text (dynamo specialises sizes 1) and one for all the others
    assert graphs(counter) <= 2
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=1e-5)
    assert np.abs(compiled[0] - compiled[1]).max() > 1e-2  # control


def test_encode_cli_compile_flag(folder, counted_compile, tmp_path, capsys):
    counter, options = counted_compile
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    status = main(["encode", str(folder), "-i", str(source), "-o", str(tmp_path / "out.npy"), "--device", "cpu",
                   "--compile", "--no-progress"])
    assert status == 0 and options == [{"fullgraph": True, "dynamic": True}] and graphs(counter) == 1
    eager = encode(load_encoder(str(folder), device="cpu"), TEXTS)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), eager, rtol=0, atol=1e-5)
