"""Inputs and independent reference computations for the model tests: padded batches, the additive mask and
positions transformers' models are given, and per-text SDPA as a correct varlen kernel computes it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
