"""FP8 inference (`load_encoder(..., quantize="fp8")`, `diffembed encode --quantize fp8`) on CPU: every refusal
path, and torchao's real quantization of the model's linear layers (its CUDA gate patched for the test)."""

import sys

import numpy as np
import pytest
import torch
from helpers.models import tiny_model

from diffembed_hf import encoding, fp8
from diffembed_hf.cli import main
from diffembed_hf.encoding import load_encoder
from diffembed_hf.errors import QuantizationUnavailable
from diffembed_hf.fp8 import check_fp8_support, quantize_fp8

TEXTS = ["a short text", "photosynthesis turns light into chemical energy in plants " * 3, "x"]


def fake_gpu(monkeypatch, capability, name="NVIDIA H100 80GB HBM3"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return str(tiny_folders(name="m", pad_token_id=0))


def test_refused_without_a_cuda_device():
    with pytest.raises(QuantizationUnavailable, match=r"needs a CUDA GPU of compute capability 8\.9.*'cpu'"):
        check_fp8_support("cpu")


def test_refused_when_cuda_is_requested_but_absent(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QuantizationUnavailable, match="no CUDA GPU is available"):
        check_fp8_support("cuda")


@pytest.mark.parametrize("capability, name, accepted", [
    ((8, 0), "NVIDIA A100-SXM4-80GB", False),
    ((8, 6), "NVIDIA GeForce RTX 3090", False),
    ((8, 9), "NVIDIA L4", True),
    ((9, 0), "NVIDIA H200", True),
    ((10, 0), "NVIDIA B200", True),
])
def test_compute_capability_gate_names_the_gpu(monkeypatch, capability, name, accepted):
    fake_gpu(monkeypatch, capability, name)
    if accepted:
        assert check_fp8_support("cuda:0") is None
        return
    with pytest.raises(QuantizationUnavailable) as error:
        check_fp8_support("cuda:0")
    assert f"{name} has {capability[0]}.{capability[1]}" in str(error.value)
    assert "8.9 or newer" in str(error.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_refused_with_other_weight_dtypes(monkeypatch, dtype):
    fake_gpu(monkeypatch, (9, 0))
    with pytest.raises(QuantizationUnavailable, match=f"dtype={dtype} was requested"):
        check_fp8_support("cuda", dtype)
    assert check_fp8_support("cuda", torch.bfloat16) is None  # control


def test_refused_with_sentence_transformers_5(monkeypatch):
    """sentence-transformers 5.x moves the model at every encode call, which torchao's FP8 weights do not survive
    (seen with 5.2: "_apply(): Couldn't swap Linear.weight")."""
    import sentence_transformers

    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(sentence_transformers, "__version__", "5.2.0")
    with pytest.raises(QuantizationUnavailable,
                       match=r"sentence-transformers 5\.2\.0 .*needs sentence-transformers >= 6"):
        check_fp8_support("cuda")
    monkeypatch.setattr(sentence_transformers, "__version__", "6.0.1")
    assert check_fp8_support("cuda") is None  # control


def test_refused_without_torchao_and_names_the_extra(monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # import fails as if not installed
    with pytest.raises(QuantizationUnavailable,
                       match=r"torchao, which is not installed: pip install 'diffembed-hf\[fp8\]'"):
        check_fp8_support("cuda")


def test_refused_with_old_torchao_or_torch(monkeypatch):
    import torchao

    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(torchao, "__version__", "0.12.0")
    with pytest.raises(QuantizationUnavailable, match=r"torchao 0\.12\.0 is too old; FP8 needs torchao >= 0\.13"):
        check_fp8_support("cuda")
    monkeypatch.setattr(torchao, "__version__", "0.18.0")
    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    with pytest.raises(QuantizationUnavailable, match=r"torch 2\.4\.1\+cu121 is too old; FP8 needs torch >= 2\.5"):
        check_fp8_support("cuda")


def test_every_problem_is_named_at_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(QuantizationUnavailable) as error:
        check_fp8_support("cpu", torch.float32)
    message = str(error.value)
    assert "dtype=torch.float32" in message and "'cpu'" in message and "diffembed-hf[fp8]" in message


def test_load_encoder_refuses_before_loading(monkeypatch, folder):
    monkeypatch.setattr(encoding, "SentenceTransformer", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(QuantizationUnavailable, match="CUDA"):
        load_encoder(folder, device="cpu", quantize="fp8")
    with pytest.raises(ValueError, match="quantize='int4' is not supported"):
        load_encoder(folder, device="cpu", quantize="int4")


def test_cli_passes_the_option_and_writes_nothing_when_refused(folder, tmp_path, capsys):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    out = tmp_path / "e.npy"
    assert main(["encode", folder, "-i", str(tmp_path / "texts.txt"), "-o", str(out), "--device", "cpu",
                 "--quantize", "fp8"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("diffembed encode: error: quantize='fp8' cannot run here") and "CUDA" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".e.npy*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["encode", folder, "-i", str(tmp_path / "texts.txt"), "-o", str(out), "--quantize", "int4"])
    assert exit_info.value.code == 2


@pytest.fixture
def torchao_without_cuda_gate(monkeypatch):
    """torchao asserts an FP8-capable CUDA GPU when quantizing; its CPU fallback computes the same maths."""
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(fp8, "check_fp8_support", lambda device, dtype=None: None)


def test_fp8_encoder_quantizes_every_linear_layer_and_agrees_with_bf16(folder, torchao_without_cuda_gate):
    from torchao.quantization import Float8Tensor

    bf16 = load_encoder(folder, device="cpu", dtype=torch.bfloat16)
    fp8 = load_encoder(folder, device="cpu", quantize="fp8")  # dtype defaults to bf16 with quantize
    backbone = fp8[0].auto_model
    linears = {name: m for name, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 7 * backbone.config.num_hidden_layers
    assert all(isinstance(m.weight, Float8Tensor) for m in linears.values())
    assert backbone.model.embed_tokens.weight.dtype == torch.bfloat16  # the rest stays bf16
    assert backbone.model.norm.weight.dtype == torch.bfloat16
    reference = encoding.encode(bf16, TEXTS, convert_to_tensor=True)
    quantized = encoding.encode(fp8, TEXTS, convert_to_tensor=True)
    assert quantized.dtype == torch.float32
    torch.testing.assert_close(quantized.norm(dim=1), torch.ones(len(TEXTS)), rtol=1e-5, atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(quantized, reference)
    assert cosine.min() > 0.98
    assert not torch.allclose(quantized, reference, atol=1e-4)  # control: FP8 really ran


def test_quantize_fp8_counts_layers_and_leaves_odd_sizes_in_bf16(torchao_without_cuda_gate, caplog):
    model = tiny_model(intermediate_size=100).to(torch.bfloat16)  # gate/up/down: 100 is not a multiple of 16
    assert quantize_fp8(model) == 4 * model.config.num_hidden_layers
    assert "6 of 14 linear layers stay in bfloat16" in caplog.text
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def test_cli_encode_with_fp8(folder, tmp_path, torchao_without_cuda_gate):
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS))
    main(["encode", folder, "-i", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "fp8.npy"), "--device", "cpu",
          "--quantize", "fp8"])
    main(["encode", folder, "-i", str(tmp_path / "texts.txt"), "-o", str(tmp_path / "fp32.npy"), "--device", "cpu"])
    fp8, fp32 = np.load(tmp_path / "fp8.npy"), np.load(tmp_path / "fp32.npy")
    assert fp8.shape == fp32.shape == (3, 64)
    assert (fp8 * fp32).sum(1).min() > 0.98 and not np.allclose(fp8, fp32, atol=1e-4)
