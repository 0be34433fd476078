"""The compiled backends: ops of ``pyobjectives._C`` as registered torch ops.

``csrc/ops.cpp`` defines the schemas (``torch.ops.pyobjectives.*``) and the CPU
kernels; this module adds what torch needs to treat them as ordinary ops: a fake
(meta) implementation of each, so ``torch.compile(fullgraph=True)`` and
``torch.export`` trace through them, and the autograd formula of each forward op.
The ``cuda`` backend shares these ops and registrations (same schemas, another
dispatch key). Import it only through :mod:`pyobjectives.backends`, which loads
it once the extension is known to import.

==========================  ===============================================  =====================
op                          forward                                          backward
==========================  ===============================================  =====================
two_stream_attention        ``two_stream_attention_fwd`` (outputs + row      ``..._bwd`` (recomputes
                            logsumexp)                                       probabilities)
rtd_loss                    ``rtd_loss_fwd`` (loss, stats, d loss / d z)     scales the saved grad
linear_cross_entropy        ``linear_cross_entropy_fwd`` (gradient for a     scales it; ``none``:
                            unit output gradient from the same sweep)        ``..._bwd`` recomputes
==========================  ===============================================  =====================
"""

from __future__ import annotations

import functools
import math

import torch

import pyobjectives._C as _C  # noqa: F401  (registers the ops)

from .reference.philox import seed_tensor

ops = torch.ops.pyobjectives
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}
NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def blas_name() -> str:
    return _C.blas_name()


# --- two-stream attention --------------------------------------------------------------

_ATTN_ARGS = ("q", "k", "v", "r", "r_w_bias", "r_r_bias", "q_g", "target_pos", "q_rank", "k_rank", "attn_mask",
              "key_padding_mask", "causal", "seg_q", "seg_k", "seg_diff", "r_s_bias", "seg_embed", "t5_bias",
              "t5_num_buckets", "t5_max_distance", "t5_bidirectional", "content_sees_self", "scale", "dropout_p", "seed", "empty_uniform")
_ATTN_GRAD_OF = {"q": 0, "k": 1, "v": 2, "r": 3, "r_w_bias": 4, "r_r_bias": 5, "q_g": 6, "r_s_bias": 7,
                 "seg_embed": 8, "t5_bias": 9}


@torch.library.register_fake("pyobjectives::two_stream_attention_fwd")
def _attention_fwd_fake(q, k, v, r, r_w_bias, r_r_bias, q_g, target_pos, *rest):
    B, Lq, H, D = q.shape
    P = q_g.shape[1] if q_g is not None else 0
    return (q.new_empty(B, Lq, H, D), q.new_empty(B, P, H, D), q.new_empty(B, H, Lq, dtype=torch.float32),
            q.new_empty(B, H, P, dtype=torch.float32))


@torch.library.register_fake("pyobjectives::two_stream_attention_bwd")
def _attention_bwd_fake(do_h, do_g, out_h, out_g, lse_h, lse_g, *args):
    a = dict(zip(_ATTN_ARGS, args))
    q = a["q"]
    empty = lambda: q.new_empty(0)  # noqa: E731
    like = lambda t: empty() if t is None else t.new_empty(t.shape)  # noqa: E731
    segments = a["seg_q"] is not None or a["seg_diff"] is not None
    return [like(q), like(a["k"]), like(a["v"]), like(a["r"]), like(a["r_w_bias"]), like(a["r_r_bias"]),
            q.new_empty(out_g.shape), like(a["r_s_bias"]) if segments else empty(),
            like(a["seg_embed"]) if segments else empty(), like(a["t5_bias"])]


def _attention_setup(ctx, inputs, output):
    _, _, lse_h, lse_g = output
    out_h, out_g = output[0], output[1]
    is_tensor = [isinstance(x, torch.Tensor) for x in inputs]
    ctx.is_tensor = is_tensor
    ctx.scalars = [None if t else x for t, x in zip(is_tensor, inputs)]
    ctx.save_for_backward(*[x for x, t in zip(inputs, is_tensor) if t], out_h, out_g, lse_h, lse_g)


def _attention_backward(ctx, do_h, do_g, _lse_h, _lse_g):
    saved = list(ctx.saved_tensors)
    out_h, out_g, lse_h, lse_g = saved[-4:]
    tensors = iter(saved[:-4])
    args = [next(tensors) if t else s for t, s in zip(ctx.is_tensor, ctx.scalars)]
    do_h = torch.zeros_like(out_h) if do_h is None else do_h.to(out_h.dtype)
    do_g = torch.zeros_like(out_g) if do_g is None else do_g.to(out_g.dtype)
    grads = ops.two_stream_attention_bwd(do_h, do_g, out_h, out_g, lse_h, lse_g, *args)
    named = dict(zip(_ATTN_ARGS, args))
    result = []
    for name in _ATTN_ARGS:
        index = _ATTN_GRAD_OF.get(name)
        result.append(grads[index] if index is not None and named[name] is not None else None)
    return tuple(result)


torch.library.register_autograd("pyobjectives::two_stream_attention_fwd", _attention_backward,
                                setup_context=_attention_setup)


def two_stream_attention(q, k, v, r=None, r_w_bias=None, r_r_bias=None, *, q_g=None, target_pos=None, q_rank=None,
                         k_rank=None, attn_mask=None, key_padding_mask=None, causal=False, seg_q=None, seg_k=None,
                         seg_diff=None, r_s_bias=None, seg_embed=None, t5_bias=None, t5_num_buckets=32,
                         t5_max_distance=128, t5_bidirectional=True, content_sees_self=True, scale=None,
                         dropout_p=0.0, seed=None, empty_rows="zero"):
    """Native backend of :func:`pyobjectives.two_stream_attention` (arguments validated there)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out_h, out_g, _, _ = ops.two_stream_attention_fwd(
        q, k, v, r, r_w_bias, r_r_bias, q_g, target_pos, q_rank, k_rank, attn_mask, key_padding_mask, bool(causal),
        seg_q, seg_k, seg_diff, r_s_bias, seg_embed, t5_bias, int(t5_num_buckets), int(t5_max_distance),
        bool(t5_bidirectional), bool(content_sees_self), scale, float(dropout_p), seed_tensor(seed) if dropout_p > 0 else None,
        empty_rows == "uniform")
    return out_h, (out_g if q_g is not None else None)


def two_stream_attention_not_supported_reasons(inputs) -> list:
    q = inputs["q"]
    if q.dtype not in NATIVE_DTYPES:
        return [f"dtype {q.dtype}: the native kernels compute in float32 for float32, bfloat16 and float16 inputs"]
    return []


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


#: What the CUDA attention kernels compile (csrc/cuda/launchers.h: two_stream_attention_unsupported).
CUDA_ATTENTION_DTYPES = (torch.bfloat16, torch.float16)
CUDA_ATTENTION_HEAD_DIMS = (64, 128)


def two_stream_attention_cuda_not_supported_reasons(inputs) -> list:
    q = inputs["q"]
    reasons = []
    if q.dtype not in CUDA_ATTENTION_DTYPES:
        reasons.append(f"dtype {q.dtype}: the CUDA attention kernels take bfloat16 and float16 (tensor cores)")
    if q.shape[-1] not in CUDA_ATTENTION_HEAD_DIMS:
        reasons.append(f"head dim {q.shape[-1]}: the CUDA attention kernels are compiled for D in "
                       f"{CUDA_ATTENTION_HEAD_DIMS}")
    if q.is_cuda and torch.cuda.is_available():
        major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
        if major < 8:
            reasons.append(f"compute capability {major}.{minor}: the CUDA attention kernels need 8.0 or newer "
                           "(SM80 tensor-core instructions)")
    return reasons


# --- RTD loss ----------------------------------------------------------------------------

_STAT_NAMES = ("accuracy", "precision", "recall", "replaced", "tokens")


@torch.library.register_fake("pyobjectives::rtd_loss_fwd")
def _rtd_fwd_fake(x, head_weight, head_bias, corrupted_ids, original_ids, attention_mask, loss_weight, reduction,
                  keep_grad, head_weight_grad):
    lead = x.shape[:-1] if head_weight is not None else x.shape
    T = math.prod(lead)
    loss = x.new_empty(lead) if reduction == 0 else x.new_empty(())
    f32 = dict(dtype=torch.float32)
    dw_fwd = head_weight is not None and head_weight_grad and reduction != 0
    return (loss, x.new_empty(5, **f32), x.new_empty(T if keep_grad else 0, **f32),
            x.new_empty(x.shape[-1] if dw_fwd else 0, **f32), x.new_empty(7, dtype=torch.float64))


@torch.library.register_fake("pyobjectives::rtd_loss_head_bwd")
def _rtd_head_bwd_fake(grad, coef, head_weight, x):
    return x.new_empty(x.shape)


def _rtd_setup(ctx, inputs, output):
    x, head_weight, head_bias, _, _, _, loss_weight, reduction, keep_grad, head_weight_grad = inputs
    _, _, grad, dw, sums = output
    ctx.loss_weight, ctx.reduction = loss_weight, reduction
    ctx.has_head, ctx.has_bias = head_weight is not None, head_bias is not None
    ctx.bias_dtype = head_bias.dtype if head_bias is not None else None
    ctx.save_for_backward(x, head_weight, grad, dw, sums)


def _rtd_backward(ctx, grad_loss, _stats, _grad, _dw, _sums):
    x, w, grad, dw_sum, sums = ctx.saved_tensors
    lw = ctx.loss_weight
    if ctx.reduction == 0:
        coef64 = None
        coef = (grad_loss.float() * lw).reshape(-1).contiguous()
    else:
        denom = sums[1].clamp(min=1) if ctx.reduction == 1 else torch.ones_like(sums[1])
        coef64 = grad_loss.double() * lw / denom  # the scalar gradients use it unrounded
        coef = coef64.float().reshape(1)
    dx = dw = db = None
    if not ctx.has_head:
        if grad.numel() or x.numel() == 0:
            dx = (grad * coef).to(x.dtype).view(x.shape)
        return dx, None, None, None, None, None, None, None, None, None
    if grad.numel() or x.numel() == 0:
        dx = ops.rtd_loss_head_bwd(grad, coef, w, x)
    if coef64 is not None and dw_sum.numel():
        dw = (dw_sum.double() * coef64).to(w.dtype)
    elif grad.numel() or x.numel() == 0:
        dw = ((grad * coef) @ x.reshape(-1, x.shape[-1]).float()).to(w.dtype)
    if ctx.has_bias:
        db = (sums[6] * coef64).to(ctx.bias_dtype) if coef64 is not None else (grad * coef).sum().to(ctx.bias_dtype)
    return dx, dw, db, None, None, None, None, None, None, None


torch.library.register_autograd("pyobjectives::rtd_loss_fwd", _rtd_backward, setup_context=_rtd_setup)


def rtd_loss(logits_or_hidden, corrupted_ids, original_ids, attention_mask=None, *, loss_weight=1.0,
             reduction="mean", head_weight=None, head_bias=None, return_stats=False):
    """Native backend of :func:`pyobjectives.rtd_loss` (arguments validated there)."""
    x, w, b = logits_or_hidden, head_weight, head_bias
    grad = torch.is_grad_enabled()
    need_x = grad and x.requires_grad
    need_w = grad and w is not None and w.requires_grad
    need_b = grad and b is not None and b.requires_grad
    per_token_w = reduction == "none" and (need_w or need_b)
    loss, stats, _, _, _ = ops.rtd_loss_fwd(x, w, b, corrupted_ids, original_ids, attention_mask, float(loss_weight),
                                            REDUCTION_CODE[reduction], need_x or per_token_w, need_w)
    if not return_stats:
        return loss
    return loss, dict(zip(_STAT_NAMES, stats.detach().unbind(0)))  # metrics, not part of the graph


def rtd_loss_not_supported_reasons(inputs) -> list:
    x = inputs["logits_or_hidden"]
    if x.dtype not in NATIVE_DTYPES:
        return [f"logits_or_hidden dtype {x.dtype}: the native kernels take float32, bfloat16 and float16"]
    return []


# --- linear + cross-entropy ----------------------------------------------------------------

@torch.library.register_fake("pyobjectives::linear_cross_entropy_fwd")
def _lce_fwd_fake(hidden, weight, bias, targets, ignore_index, reduction, sample, temperature, seed, disallow,
                  want_argmax, compute_grad):
    N, E = hidden.shape
    V = weight.shape[0]
    i64, f32 = dict(dtype=torch.int64), dict(dtype=torch.float32)
    loss = hidden.new_empty(N) if reduction == 0 else hidden.new_empty(())
    return (loss, hidden.new_empty(N if sample else 0, **i64), hidden.new_empty(N if want_argmax else 0, **i64),
            hidden.new_empty((N, E) if compute_grad else (0,), **f32),
            hidden.new_empty((V, E) if compute_grad else (0,), **f32),
            hidden.new_empty(V if compute_grad and bias is not None else 0, **f32))


@torch.library.register_fake("pyobjectives::linear_cross_entropy_bwd")
def _lce_bwd_fake(hidden, weight, bias, targets, ignore_index, grad_rows):
    f32 = dict(dtype=torch.float32)
    return (hidden.new_empty(hidden.shape, **f32), hidden.new_empty(weight.shape, **f32),
            hidden.new_empty(weight.shape[0] if bias is not None else 0, **f32))


def _lce_setup(ctx, inputs, output):
    hidden, weight, bias, targets, ignore_index, reduction = inputs[:6]
    _, _, _, d_hidden, d_weight, d_bias = output
    ctx.ignore_index, ctx.reduction = ignore_index, reduction
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.save_for_backward(hidden, weight, bias, targets, d_hidden, d_weight, d_bias)


def _lce_backward(ctx, grad_loss, _sampled, _argmax, _dh, _dw, _db):
    hidden, weight, bias, targets, d_hidden, d_weight, d_bias = ctx.saved_tensors
    if ctx.reduction == 0 or d_hidden.numel() != hidden.numel():
        # per-row output gradients (or no gradient formed in the forward): recompute the logits
        kept = ((targets != ctx.ignore_index) & (targets >= 0) & (targets < weight.shape[0])).float()
        if ctx.reduction == 0:
            rows = grad_loss.float() * kept
        elif ctx.reduction == 1:
            rows = grad_loss.float() * kept / kept.sum().clamp(min=1)
        else:
            rows = grad_loss.float() * kept
        d_hidden, d_weight, d_bias = ops.linear_cross_entropy_bwd(hidden, weight, bias, targets, ctx.ignore_index,
                                                                  rows)
        g = None
    else:
        g = grad_loss.float()
    scale = (lambda t: t) if g is None else (lambda t: t * g)  # noqa: E731
    dh = scale(d_hidden).to(ctx.dtypes[0])
    dw = scale(d_weight).to(ctx.dtypes[1])
    db = scale(d_bias).to(ctx.dtypes[2]) if bias is not None else None
    return dh, dw, db, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("pyobjectives::linear_cross_entropy_fwd", _lce_backward, setup_context=_lce_setup)


def linear_cross_entropy(hidden, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", sample=False,
                         temperature=1.0, seed=None, disallow=None, return_argmax=False):
    """Native backend of :func:`pyobjectives.linear_cross_entropy` (arguments validated there).

    Extra memory: one chunk of float32 logits (at most 32 MiB, or 16 rows once V > 512K:
    ``csrc/cpu/linear_cross_entropy.cpp``)
    plus, when gradients are needed, float32 d hidden / d weight formed during the forward sweep
    (mean / sum) and float32 copies of half-precision weights.
    ``return_argmax=True`` appends ``argmax_v z [N]`` (used by :class:`pyobjectives.nn.ElectraObjective`).
    """
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))
    loss, sampled, argmax, _, _, _ = ops.linear_cross_entropy_fwd(
        hidden, weight, bias, targets, int(ignore_index), REDUCTION_CODE[reduction], bool(sample), float(temperature),
        seed_tensor(seed) if sample else None, disallow, bool(return_argmax), grad and reduction != "none")
    if not sample and not return_argmax:
        return loss
    out = (loss,) + ((sampled,) if sample else ()) + ((argmax,) if return_argmax else ())
    return out


def linear_cross_entropy_not_supported_reasons(inputs) -> list:
    h = inputs["hidden"]
    if h.dtype not in NATIVE_DTYPES:
        return [f"hidden dtype {h.dtype}: the native kernels take float32, bfloat16 and float16"]
    return []
