"""Which attention kernel runs DiffEmbed here: the optional varlen kernels, their self-test against SDPA, and the
choice of path per device and dtype.

Hub remote code beside `modeling_diffembed.py` (copied into every checkpoint with it): imports only `torch`,
`transformers` and this folder's files. The optional kernels are imported inside `try:` blocks. A kernel is used
only after a tiny forward + backward call agrees with SDPA on this device, dtype and head shape; the answer is cached
for the process (`_kernel_probe_cache`), because it cannot change until the weights move.
"""

import functools
import inspect

import torch
import torch.nn.functional as F
from transformers.utils import logging

from .configuration_diffembed import DiffEmbedConfig

logger = logging.get_logger(__name__)

try:  # the real flash-attn 2; a look-alike package that lacks the varlen function fails here
    from flash_attn import flash_attn_varlen_func
except Exception:  # noqa: BLE001 - a broken CUDA build raises OSError/RuntimeError, not only ImportError
    flash_attn_varlen_func = None

try:  # torch >= 2.10: torch's own FlashAttention-2 kernels on unpadded tokens
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

try:  # FlashAttention-4 (`pip install flash-attn-4`): the CuTe kernels written for Hopper and Blackwell
    from flash_attn.cute import flash_attn_varlen_func as flash_attn_4_varlen_func
except Exception:  # noqa: BLE001 - its CUDA DSL dependencies fail in many ways where they cannot run
    flash_attn_4_varlen_func = None


# Names of the paths that can run, as reported by `DiffEmbedPreTrainedModel.attention_backend`.
#   eager / sdpa:       padded batch, explicit key-padding mask (reference paths)
#   flash_attn_4:       packed tokens, FlashAttention-4's `flash_attn.cute.flash_attn_varlen_func` (CUDA >= sm90)
#   flash_attn_varlen:  packed tokens, flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16)
#   torch_varlen:       packed tokens, `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16)
#   packed_sdpa:        packed tokens for every token-wise op, SDPA run per text (CPU)
#   packed_eager:       as packed_sdpa with eager attention (packed input when eager is requested)
#   packed_masked_sdpa / packed_masked_eager: packed tokens, attention on the texts re-padded per layer under a
#                       key mask (packed input where the per-text lengths are not on the host: compiled, or
#                       `cu_seq_lens_q` on an accelerator without a varlen kernel)
VARLEN_KERNELS = ("flash_attn_4", "flash_attn_varlen", "torch_varlen")
MASKED_PACKED = ("packed_masked_sdpa", "packed_masked_eager")
PACKED_BACKENDS = VARLEN_KERNELS + ("packed_sdpa", "packed_eager") + MASKED_PACKED

# How far a kernel's probe output may be from the fp32 SDPA reference (largest per-token relative error) and
# its gradients (relative error of each of dq, dk, dv). SDPA itself in bf16 lands at 2e-3 and 4e-3 on Dream's
# heads (fp16: 3e-4, 5e-4); a missed text boundary, scale or head mapping lands far above 1e-1.
_PROBE_TOLERANCE = {torch.bfloat16: (3e-2, 6e-2), torch.float16: (1e-2, 2e-2), torch.float32: (1e-4, 1e-4)}
_PROBE_LENGTHS = (5, 1, 12, 3)  # several texts, one of a single token: leaks across boundaries show up

_kernel_probe_cache: dict = {}


def probe_kernel(name: str, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                 head_dim: int, causal: bool = False):
    """How to call varlen kernel `name` on this device for grouped heads, or None if it cannot run here or
    disagrees with SDPA (cached). The comparison itself is `_working_gqa_mode`, which runs anywhere."""
    key = (name, device.type, device.index, dtype, num_heads, num_kv_heads, head_dim, causal)
    if key not in _kernel_probe_cache:
        if torch.compiler.is_compiling():  # a forward + backward self-test cannot be part of a traced graph
            raise RuntimeError(
                f"The {name} kernel has not been tested on {device} in {dtype} yet: call model.prepare_attention() "
                "(done by from_pretrained and .to()) before torch.compile."
            )
        mode = None
        if _kernel_may_run(name, device, dtype):
            mode = _working_gqa_mode(name, num_heads, num_kv_heads, head_dim, device, dtype, causal)
        _kernel_probe_cache[key] = mode
    return _kernel_probe_cache[key]


def _kernel_may_run(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """The hardware gate: varlen kernels run on CUDA in half precision; FlashAttention-4 only from Hopper on."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    kernel = {"flash_attn_4": flash_attn_4_varlen_func, "flash_attn_varlen": flash_attn_varlen_func,
              "torch_varlen": varlen_attn}[name]
    if kernel is None:
        return False
    return name != "flash_attn_4" or torch.cuda.get_device_capability(device) >= (9, 0)


def _segment_sdpa(q, k, v, lengths, scale, causal):
    """Reference varlen attention: SDPA per text on `[tokens, heads, head_dim]`, grouped kv heads repeated."""
    groups = q.shape[1] // k.shape[1]
    outputs = []
    for qi, ki, vi in zip(*(x.split(list(lengths)) for x in (q, k, v))):
        ki, vi = ki.repeat_interleave(groups, dim=1), vi.repeat_interleave(groups, dim=1)
        qi, ki, vi = (x.transpose(0, 1)[None] for x in (qi, ki, vi))
        outputs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=causal, scale=scale)[0].transpose(0, 1))
    return torch.cat(outputs)


def _working_gqa_mode(name, num_heads, num_kv_heads, head_dim, device, dtype, causal=False):
    """Run the kernel on a tiny packed batch, forward and backward, and compare it with SDPA per text (in fp32
    on the same inputs); return the first grouped-head mode whose numbers agree, or None.

    Import success is not enough, and neither is "it did not raise": look-alike flash-attn builds import and
    then raise on call, torch 2.11's `varlen_attn` has no `enable_gqa` argument, and a broken build may return
    wrong numbers. Modes: "native" (kernel accepts fewer kv heads), "enable_gqa" (pass that flag, torch's
    varlen_attn) or "repeat" (repeat kv heads first). Every rejection is logged.
    """
    lengths = list(_PROBE_LENGTHS)
    total = sum(lengths)
    scale = head_dim**-0.5
    out_tol, grad_tol = _PROBE_TOLERANCE[dtype]
    # Every probe tensor is made here: under a caller's inference_mode they would be inference tensors, which
    # kernels cannot save for backward, and every kernel would be rejected (and the rejection cached).
    with torch.inference_mode(False), torch.enable_grad():
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(total, num_heads, head_dim, generator=gen)
        k = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        v = torch.randn(total, num_kv_heads, head_dim, generator=gen)
        weight = torch.randn(total, num_heads, head_dim, generator=gen)
        q, k, v = (x.to(device, dtype) for x in (q, k, v))
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
        exact = [x.detach().float().requires_grad_() for x in (q, k, v)]
        expected = _segment_sdpa(*exact, lengths, scale, causal)
        expected_grads = torch.autograd.grad((expected * weight.to(device)).sum(), exact)
        modes = ("native", "repeat") if name != "torch_varlen" else ("native", "enable_gqa", "repeat")
        for mode in modes if num_heads != num_kv_heads else ("native",):
            inputs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
            try:
                out = call_varlen_kernel(name, mode, *inputs, cu, max(lengths), scale, causal)
                grads = torch.autograd.grad((out.float() * weight.to(device)).sum(), inputs)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as err:  # noqa: BLE001 - any refusal means "do not use this mode"
                logger.info("Varlen kernel %s (%s grouped heads) cannot run here: %s", name, mode, err)
                continue
            if out.shape != q.shape:
                logger.warning("Varlen kernel %s (%s) returned shape %s for %s; skipped.", name, mode,
                               tuple(out.shape), tuple(q.shape))
                continue
            out_error = _token_relative_error(out.detach().float(), expected.detach())
            grad_error = max(_relative_error(g.float(), e) for g, e in zip(grads, expected_grads))
            if out_error <= out_tol and grad_error <= grad_tol:
                return mode
            logger.warning(
                "Varlen kernel %s (%s grouped heads) disagrees with SDPA on a test batch (output error %.1e, "
                "gradient error %.1e; tolerance %.0e / %.0e in %s): not used.", name, mode, out_error, grad_error,
                out_tol, grad_tol, dtype,
            )
    return None


def _token_relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest relative error of one token's output over all heads (NaN counts as infinitely wrong)."""
    error = (out - expected).flatten(1).norm(dim=1) / expected.flatten(1).norm(dim=1).clamp(min=1e-6)
    return float(torch.nan_to_num(error, nan=float("inf")).max())


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    error = float((a - b).norm() / b.norm().clamp(min=1e-6))
    return float("inf") if error != error else error


@functools.lru_cache(maxsize=None)
def _parameters(fn) -> frozenset:
    """Parameter names of `fn`, inspected once: torch's varlen_attn changed its signature between releases."""
    return frozenset(inspect.signature(fn).parameters)


def call_varlen_kernel(name, gqa_mode, q, k, v, cu_seqlens, max_seqlen, scale, causal):
    """Call a varlen kernel on packed `[tokens, heads, head_dim]` tensors. All three take int32 `cu_seqlens`."""
    if gqa_mode == "repeat" and k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if name == "flash_attn_4":
        out = flash_attn_4_varlen_func(
            q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen, softmax_scale=scale, causal=causal,
        )
        return out[0] if isinstance(out, tuple) else out  # (out, lse) in 4.0 betas; a tensor in earlier ones
    if name == "flash_attn_varlen":
        return flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=0.0, softmax_scale=scale, causal=causal
        )
    params = _parameters(varlen_attn)
    kwargs = {"scale": scale}
    if "window_size" in params:  # torch >= 2.11
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    elif causal:  # torch 2.10
        kwargs["is_causal"] = True
    if gqa_mode == "enable_gqa":
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def select_backend(config: DiffEmbedConfig, device: torch.device, dtype: torch.dtype) -> str:
    """Map the requested `attn_implementation` and the hardware to the path that runs.

    Automatic order: FlashAttention-4, flash-attn 2, torch's varlen_attn, each only if its probe call agrees
    with SDPA. FlashAttention-4 comes first because it is the only one written for Hopper and Blackwell
    (warp-group MMA, TMA; tcgen05 on Blackwell): flash-attn 2 and torch's kernels run Ampere code there, and the
    FlashAttention-3 paper reports Hopper kernels 1.5-2x faster than flash-attn 2 on an H100 (not measured by
    this project). It is only tried from compute capability 9.0 on, the GPUs it was written for."""
    requested = config._attn_implementation
    if requested in ("eager", "sdpa"):
        return requested
    heads = (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.is_causal)
    if requested == "flash_attention_2":
        if probe_kernel("flash_attn_varlen", device, dtype, *heads) is None:
            raise RuntimeError(
                f"attn_implementation='flash_attention_2' cannot run on {device} in {dtype}: flash-attn needs a "
                "CUDA device and float16/bfloat16 weights, and its test call must agree with SDPA (see the log)."
            )
        return "flash_attn_varlen"
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        for kernel in VARLEN_KERNELS:
            if probe_kernel(kernel, device, dtype, *heads) is not None:
                return kernel
        logger.warning_once("No varlen attention kernel works here; DiffEmbed runs padded SDPA (slower).")
        return "sdpa"
    if device.type == "cuda":  # float32 on CUDA: one padded SDPA call beats a per-text loop of kernel launches
        return "sdpa"
    return "packed_sdpa"


def flash_attn_2_available() -> bool:
    """Whether flash-attn 2's `flash_attn_varlen_func` imported (`attn_implementation='flash_attention_2'`)."""
    return flash_attn_varlen_func is not None


_logged_backends: set = set()


def log_backend_once(backend: str):
    """Say once per process which attention path runs: users need to know whether they got the fast one."""
    if backend not in _logged_backends:
        _logged_backends.add(backend)
        logger.info("DiffEmbed attention path: %s", backend)
