"""Shared fixtures: tiny DiffEmbed configs and the transformers reference models they must match."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DIFFEMBED_CACHE", tempfile.mkdtemp(prefix="diffembed-test-cache-"))
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from diffembed_hf import DiffEmbedConfig, DiffEmbedForEmbedding  # noqa: E402

hf_logging.disable_progress_bar()


@pytest.fixture
def one_thread():
    """One torch thread for the test: on 2 shared cores, two OpenMP threads whose partner core is busy spin and run
    many times slower (modules that embed many texts use it: `pytestmark = pytest.mark.usefixtures(...)`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)


def tiny_config(**overrides) -> DiffEmbedConfig:
    kwargs = dict(TINY, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    kwargs.update(overrides)
    return DiffEmbedConfig(**kwargs)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random weights everywhere (norm weights and biases too) so that no parameter can hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def tiny_model(seed: int = 0, **overrides) -> DiffEmbedForEmbedding:
    return randomize(DiffEmbedForEmbedding(tiny_config(**overrides)), seed).eval()


def additive_mask(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[batch, 1, seq, seq] additive key-padding mask (0 = attend, dtype min = blocked), no causal part.

    Given to transformers' models as an explicit 4-D mask, this makes them bidirectional on every 5.x
    version (`config.is_causal = False` is only honoured from 5.2 on)."""
    keys = attention_mask.bool()[:, None, None, :].expand(-1, 1, attention_mask.shape[1], -1)
    return torch.zeros(keys.shape, dtype=dtype).masked_fill(~keys, torch.finfo(dtype).min)


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def make_batch(lengths, side="right", vocab=128, seed=0, pad_id=0):
    """Random ids for texts of the given lengths, padded on one side; returns (input_ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(2, vocab, (n,), generator=gen)
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, span], mask[row, span] = tokens, 1
    return ids, mask


@pytest.fixture
def tiny():
    return tiny_model()


def reference_varlen(q, k, v, cu, scale, causal):
    """Per-text SDPA with explicit GQA repetition: what a correct varlen kernel returns."""
    out = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (x[start:end].transpose(0, 1) for x in (q, k, v))
        groups = qi.shape[0] // ki.shape[0]
        ki, vi = ki.repeat_interleave(groups, 0), vi.repeat_interleave(groups, 0)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale).transpose(0, 1))
    return torch.cat(out)


def run_before_the_lock(monkeypatch, module, other_run) -> list:
    """Make `other_run()` happen, start to finish, just before the job in `module` takes its output lock (as a
    second run started at the same moment would, issue 31): its outcome is appended to the returned list (the
    result, or the error it raised)."""
    import contextlib

    real, outcomes = module.output_lock, []

    @contextlib.contextmanager
    def hooked(out):
        if not outcomes:
            outcomes.append(None)
            try:
                outcomes[0] = other_run()
            except Exception as err:  # noqa: BLE001 - the test reads what the other run raised
                outcomes[0] = err
        with real(out):
            yield

    monkeypatch.setattr(module, "output_lock", hooked)
    return outcomes
