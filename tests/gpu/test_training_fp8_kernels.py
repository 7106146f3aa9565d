"""CUDA-only checks of the kernel self-check, FlashAttention-4, FP8 inference and recipe training (skipped, and
not counted as passing, where no GPU is present)."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from helpers.models import tiny_config, tiny_model
from helpers.tensors import make_batch

from diffembed_hf import DiffEmbedForEmbedding, load_dream_tokenizer
from diffembed_hf.modeling import attention_kernels as kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
DREAM_HEADS = (28, 4, 128)


def installed_kernels():
    names = []
    if kernels.varlen_attn is not None:
        names.append("torch_varlen")
    if kernels.flash_attn_varlen_func is not None:
        names.append("flash_attn_varlen")
    if kernels.flash_attn_4_varlen_func is not None and torch.cuda.get_device_capability() >= (9, 0):
        names.append("flash_attn_4")
    return names


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_installed_kernel_passes_its_self_check(dtype, causal):
    """The tolerances must not reject the real kernels: each one agrees with SDPA on Dream's head geometry."""
    kernels = installed_kernels()
    assert kernels, "no varlen kernel installed on this GPU machine"
    for name in kernels:
        assert kernels._working_gqa_mode(name, *DREAM_HEADS, CUDA, dtype, causal) is not None, name


def test_self_check_rejects_a_real_kernel_called_wrongly(monkeypatch):
    """torch's own kernel, but told the whole packed batch is one text: its numbers are wrong and it is skipped."""
    real = kernels.varlen_attn
    if real is None:
        pytest.skip("this torch has no varlen_attn")

    def whole_batch(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs):
        whole = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
        return real(q, k, v, whole, whole, q.shape[0], q.shape[0], **kwargs)

    monkeypatch.setattr(kernels, "varlen_attn", whole_batch)
    assert kernels._working_gqa_mode("torch_varlen", *DREAM_HEADS, CUDA, torch.bfloat16) is None
    monkeypatch.setattr(kernels, "varlen_attn", real)  # control
    assert kernels._working_gqa_mode("torch_varlen", *DREAM_HEADS, CUDA, torch.bfloat16) is not None


def dream_like():
    torch.manual_seed(0)
    config = tiny_config(hidden_size=3584, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=1024)
    with torch.device("cuda"):
        return DiffEmbedForEmbedding._from_config(config, dtype=torch.bfloat16).eval()


@pytest.mark.skipif(kernels.flash_attn_4_varlen_func is None, reason="flash-attn-4 is not installed")
def test_flash_attn_4_is_chosen_on_hopper_and_matches_sdpa():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FlashAttention-4 needs Hopper or Blackwell")
    model = dream_like()
    assert model.attention_backend == "flash_attn_4"
    ids, mask = make_batch([300, 17, 1, 129], "left", vocab=1024, seed=1)
    with torch.no_grad():
        model.config._attn_implementation = None
        fa4 = model(input_ids=ids.cuda(), attention_mask=mask).embeddings
        model.config._attn_implementation = "sdpa"
        padded = model(input_ids=ids.cuda(), attention_mask=mask).embeddings
    assert ((fa4 - padded).norm() / padded.norm()).item() < 1e-2


def saved_tiny(tmp_path):
    from diffembed_hf.sentence_transformer import save_sentence_transformer

    return str(save_sentence_transformer(tiny_model(vocab_size=151667), load_dream_tokenizer(), tmp_path / "m",
                                         max_seq_length=128))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs compute capability 8.9")
def test_fp8_encoder_on_cuda(tmp_path):
    pytest.importorskip("torchao")
    from torchao.quantization import Float8Tensor

    from diffembed_hf.encoding import encode, load_encoder

    folder = saved_tiny(tmp_path)
    texts = ["a short text", "a somewhat longer text about photosynthesis and light " * 3, "x"]
    bf16 = encode(load_encoder(folder), texts, convert_to_tensor=True)
    model = load_encoder(folder, quantize="fp8")
    assert all(isinstance(m.weight, Float8Tensor) for m in model[0].auto_model.modules()
               if isinstance(m, torch.nn.Linear))
    fp8 = encode(model, texts, convert_to_tensor=True)
    cosine = F.cosine_similarity(fp8, bf16)
    assert cosine.min() > 0.98 and not torch.allclose(fp8, bf16, atol=1e-4)


def test_recipe_training_on_cuda_takes_the_packed_path(tmp_path):
    """`train()` with the recipe (LoRA, bf16, gradient checkpointing, a hard negative): finite, falling loss,
    and DiffEmbed's varlen kernel in forward and backward."""
    from transformers import TrainerCallback

    from diffembed_hf.train import TrainingConfig, train

    words = sorted({w.strip(".,;:()").lower() for w in open(json.__file__).read().split() if w.isalpha()})
    rng = random.Random(0)
    rows = []
    for _ in range(400):
        query = rng.sample(words, 3)
        rows.append({"query": " ".join(query), "positive": " ".join(query + rng.sample(words, 5)),
                     "negative": " ".join([query[0]] + rng.sample(words, 7))})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    backends = set()

    class Spy(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            import sys

            layer = next(m for m in model.modules() if type(m).__name__ == "DiffEmbedAttention")
            module = sys.modules[type(layer).__module__]
            original = module.attention

            def spied(q, k, v, layout, scale, causal):
                out = original(q, k, v, layout, scale, causal)
                if out.requires_grad:
                    out.register_hook(lambda grad: backends.add(layout.backend))
                return out

            module.attention = spied

    config = TrainingConfig(max_steps=40, batch_size=16, learning_rate=2e-3, warmup_steps=5, max_seq_length=64,
                            save_steps=10**6, logging_steps=1, query_prompt="", eval_fraction=0.0)
    result = train(saved_tiny(tmp_path), str(data), tmp_path / "out", config, callbacks=[Spy()])
    assert all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-5:]) < 0.9 * sum(result.losses[:5])
    assert backends and backends <= {"flash_attn_4", "flash_attn_varlen", "torch_varlen"}
