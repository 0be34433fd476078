"""Fused ELECTRA replaced-token-detection loss (Triton): one pass over the tokens.

Forward, per token ``t`` (``z_t`` the logit, or ``hidden_t . head_weight + head_bias`` computed
in-kernel for the fused-head form)::

    label_t = corrupted_ids[t] != original_ids[t]          # no label tensor is materialised
    loss_t  = softplus(z_t) - label_t * z_t                 # max(z, 0) + log(1 + exp(-|z|)) - label * z
    g_t     = real_t * (sigmoid(z_t) - label_t)             # d loss_t / d z_t, same pass

Each program walks a strided set of token blocks and writes one row of partial sums (loss,
real tokens, correct, true positives, predicted, replaced, sum of g), and for the fused head
``sum_t g_t hidden_t`` ([P, Dd]). The mean's denominator is the sum of a device tensor, so
nothing synchronises with the host and the op can be captured in a CUDA graph; no real token
gives 0 / 1 = 0.0. Because the loss is a scalar, the gradient is ``s * g_t`` with one scalar
``s = grad_out * loss_weight / count``: backward only scales. In the fused head it writes
``d hidden_t = s * g_t * head_weight`` (reads g, 4 bytes a token) and reduces the partials for
``d head_weight``, ``d head_bias``; so the data moved is the floor: hidden read once (forward),
d hidden written once (backward). ``reduction="none"`` has a per-token ``grad_out``; its backward
reads hidden a second time for ``d head_weight``.

Per-token math and the ``head_weight`` partials are float32 (float64 for float64 inputs); the
loss, count and ``sum g`` partials are float64, so the scalars are rounded once. Any leading
shape and strides are accepted (leading dims are collapsed to ``[B, L]`` strides where the
layout allows, otherwise copied); ids may be any integer dtype, the mask bool, int or float.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .utils import FLOAT_DTYPES as _FLOATS
from .utils import TL_DTYPE as _TL
from .utils import cast as _cast
from .utils import interpreting as _interpreting
from .utils import new_output

_N_PARTIALS = 8  # loss, real, correct, true positive, predicted, replaced, sum g, (unused)


@triton.jit
def _rtd_fwd_kernel(
    x_ptr, w_ptr, b_ptr, c_ptr, o_ptr, m_ptr,
    tok_ptr, g_ptr, part_ptr, dwp_ptr,
    T, L, D, n_blocks,
    sx0, sx1, sxd, sc0, sc1, so0, so1, sm0, sm1,
    loss_weight,
    HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    STORE_TOK: tl.constexpr, GRAD: tl.constexpr, STORE_G: tl.constexpr, DW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    ACC: tl.constexpr, INTERP: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    # scalar accumulators (a block reduction per step keeps registers free for the loads); the
    # two sums are float64, since their fp32 rounding would otherwise be the largest error of a
    # sum / mean over many tokens
    zero64 = tl.sum(tl.zeros([BLOCK_T], tl.float64), 0)
    zero32 = tl.sum(tl.zeros([BLOCK_T], tl.int32), 0)
    acc_loss = zero64
    acc_g = zero64
    n_real = zero32
    n_correct = zero32
    n_tp = zero32
    n_pred = zero32
    n_repl = zero32
    dwp_row = dwp_ptr + pid.to(tl.int64) * D
    if HEAD:
        bias = tl.zeros([BLOCK_T], ACC)
        if HAS_BIAS:
            bias += tl.load(b_ptr).to(ACC)
        if D_CHUNKS == 1:
            d_in = offs_d < D
            w = tl.load(w_ptr + offs_d, mask=d_in, other=0).to(ACC)
            if DW:
                dw_acc = tl.zeros([BLOCK_D], ACC)
        elif DW:
            for c in range(D_CHUNKS):
                d = c * BLOCK_D + offs_d
                tl.store(dwp_row + d, tl.zeros([BLOCK_D], ACC), mask=d < D)
    for blk in range(pid, n_blocks, nprog):
        t = blk * BLOCK_T + offs_t
        valid = t < T
        bi = (t // L).to(tl.int64)
        li = (t % L).to(tl.int64)
        if HEAD:
            row = x_ptr + bi * sx0 + li * sx1
            if D_CHUNKS == 1:
                h = tl.load(row[:, None] + offs_d[None, :] * sxd, mask=valid[:, None] & d_in[None, :],
                            other=0).to(ACC)
                z = tl.sum(h * w[None, :], 1) + bias
            else:
                z = bias
                for c in range(D_CHUNKS):
                    d = c * BLOCK_D + offs_d
                    hc = tl.load(row[:, None] + d[None, :] * sxd, mask=valid[:, None] & (d < D)[None, :],
                                 other=0).to(ACC)
                    wc = tl.load(w_ptr + d, mask=d < D, other=0).to(ACC)
                    z += tl.sum(hc * wc[None, :], 1)
        else:
            z = tl.load(x_ptr + bi * sx0 + li * sx1, mask=valid, other=0).to(ACC)
        cid = tl.load(c_ptr + bi * sc0 + li * sc1, mask=valid, other=0)
        oid = tl.load(o_ptr + bi * so0 + li * so1, mask=valid, other=0)
        label = cid != oid
        real = valid
        if HAS_MASK:
            real = real & (tl.load(m_ptr + bi * sm0 + li * sm1, mask=valid, other=0) != 0)
        lab = label.to(ACC)
        e = tl.exp(-tl.abs(z))
        # log1p(e) without a log1p: log(u) * e / (u - 1) with u = 1 + e is exact to rounding (Kahan)
        u = 1.0 + e
        tiny = u == 1.0
        log1p_e = tl.where(tiny, e, tl.log(u) * (e / tl.where(tiny, 1.0, u - 1.0)))
        # max(z, 0) - label * z is exact (0, z or -z): no cancellation against the log term
        loss_t = tl.where(real, (tl.maximum(z, 0.0) - lab * z) + log1p_e, 0.0)
        acc_loss += tl.sum(loss_t.to(tl.float64), 0)
        if STORE_TOK:
            tl.store(tok_ptr + t, _cast(loss_t * loss_weight, tok_ptr.dtype.element_ty, INTERP), mask=valid)
        pred = z > 0
        n_real += tl.sum(real.to(tl.int32), 0)
        n_correct += tl.sum((real & (pred == label)).to(tl.int32), 0)
        n_tp += tl.sum((real & pred & label).to(tl.int32), 0)
        n_pred += tl.sum((real & pred).to(tl.int32), 0)
        n_repl += tl.sum((real & label).to(tl.int32), 0)
        if GRAD:
            # sigmoid(z) - label without cancellation: sigmoid(z) - 1 = -sigmoid(-z)
            big = 1.0 / u  # sigmoid(|z|)
            small = e / u  # sigmoid(-|z|)
            g = tl.where(label, -tl.where(z >= 0, small, big), tl.where(z >= 0, big, small))
            g = tl.where(real, g, 0.0)
            acc_g += tl.sum(g.to(tl.float64), 0)
            if STORE_G:
                tl.store(g_ptr + t, g, mask=valid)
            if DW:
                if D_CHUNKS == 1:
                    dw_acc += tl.sum(h * g[:, None], 0)
                else:
                    for c in range(D_CHUNKS):
                        d = c * BLOCK_D + offs_d
                        hc = tl.load(row[:, None] + d[None, :] * sxd, mask=valid[:, None] & (d < D)[None, :],
                                     other=0).to(ACC)
                        old = tl.load(dwp_row + d, mask=d < D, other=0)
                        tl.store(dwp_row + d, old + tl.sum(hc * g[:, None], 0), mask=d < D)
    part = part_ptr + pid * 8
    tl.store(part + 0, acc_loss)
    tl.store(part + 1, n_real.to(tl.float64))
    tl.store(part + 2, n_correct.to(tl.float64))
    tl.store(part + 3, n_tp.to(tl.float64))
    tl.store(part + 4, n_pred.to(tl.float64))
    tl.store(part + 5, n_repl.to(tl.float64))
    tl.store(part + 6, acc_g)
    tl.store(part + 7, zero64)
    if HEAD:
        if DW:
            if D_CHUNKS == 1:
                tl.store(dwp_row + offs_d, dw_acc, mask=d_in)


@triton.jit
def _rtd_bwd_kernel(
    g_ptr, s_ptr, s_stride, w_ptr, x_ptr, dx_ptr, dwp_ptr,
    T, L, D, n_blocks, sx0, sx1, sxd,
    DX: tl.constexpr, DW: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, D_CHUNKS: tl.constexpr,
    ACC: tl.constexpr, INTERP: tl.constexpr,
):
    """Fused head: ``d hidden_t = s_t * g_t * head_weight`` (and, for a per-token ``s``, the
    partial ``sum_t s_t g_t hidden_t``)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    dwp_row = dwp_ptr + pid.to(tl.int64) * D
    if D_CHUNKS == 1:
        d_in = offs_d < D
        w = tl.load(w_ptr + offs_d, mask=d_in, other=0).to(ACC)
        if DW:
            dw_acc = tl.zeros([BLOCK_D], ACC)
    elif DW:
        for c in range(D_CHUNKS):
            d = c * BLOCK_D + offs_d
            tl.store(dwp_row + d, tl.zeros([BLOCK_D], ACC), mask=d < D)
    for blk in range(pid, n_blocks, nprog):
        t = blk * BLOCK_T + offs_t
        valid = t < T
        t64 = t.to(tl.int64)
        gs = tl.load(g_ptr + t, mask=valid, other=0).to(ACC) * tl.load(s_ptr + t64 * s_stride, mask=valid,
                                                                        other=0).to(ACC)
        row = x_ptr + (t // L).to(tl.int64) * sx0 + (t % L).to(tl.int64) * sx1
        if D_CHUNKS == 1:
            if DX:
                tl.store(dx_ptr + t64[:, None] * D + offs_d[None, :],
                         _cast(gs[:, None] * w[None, :], dx_ptr.dtype.element_ty, INTERP),
                         mask=valid[:, None] & d_in[None, :])
            if DW:
                h = tl.load(row[:, None] + offs_d[None, :] * sxd, mask=valid[:, None] & d_in[None, :],
                            other=0).to(ACC)
                dw_acc += tl.sum(h * gs[:, None], 0)
        else:
            for c in range(D_CHUNKS):
                d = c * BLOCK_D + offs_d
                d_ok = d < D
                if DX:
                    wc = tl.load(w_ptr + d, mask=d_ok, other=0).to(ACC)
                    tl.store(dx_ptr + t64[:, None] * D + d[None, :],
                             _cast(gs[:, None] * wc[None, :], dx_ptr.dtype.element_ty, INTERP),
                             mask=valid[:, None] & d_ok[None, :])
                if DW:
                    hc = tl.load(row[:, None] + d[None, :] * sxd, mask=valid[:, None] & d_ok[None, :],
                                 other=0).to(ACC)
                    old = tl.load(dwp_row + d, mask=d_ok, other=0)
                    tl.store(dwp_row + d, old + tl.sum(hc * gs[:, None], 0), mask=d_ok)
    if DW:
        if D_CHUNKS == 1:
            tl.store(dwp_row + offs_d, dw_acc, mask=d_in)


# --- launch configuration ------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _config(D: int, head: bool, dtype: torch.dtype, device: torch.device) -> dict:
    """Block sizes: the interpreter wants few, mid-size blocks; an H100 wants streaming tiles of
    4K elements of hidden per step and a persistent grid of a few programs per SM."""
    d_p2 = triton.next_power_of_2(max(D, 1))
    if _interpreting() or device.type != "cuda":
        # the interpreter pays per program and per step: two programs (the persistent loop is
        # still exercised), hidden slices of 32 (Dd = 70 takes the multi-slice path)
        block_d = min(d_p2, 32)
        block_t = 32 if head else 64
        return dict(BLOCK_T=block_t, BLOCK_D=max(block_d, 16), max_programs=2, num_warps=4)
    # 16 elements of hidden (or 4 tokens) per thread and step keep a program near 100 registers
    # (ptxas, sm_90), so two programs of 8 warps share an SM and hide each other's load latency
    wide = 2048 if dtype == torch.float64 else 4096
    if head:
        block_d = max(16, min(d_p2, 2048))
        block_t = max(4, min(256, wide // block_d))
    else:
        block_d, block_t = 16, 1024 if dtype != torch.float64 else 512
    return dict(BLOCK_T=block_t, BLOCK_D=block_d, max_programs=4 * _sm_count(device.index or 0), num_warps=8)


def _collapse(shape, strides_list):
    """Leading dims as ``(B, L)`` plus, per tensor, strides ``(sB, sL)``; None if >2 dims remain."""
    dims = [i for i, s in enumerate(shape) if s != 1]
    groups = []  # [size, [stride per tensor]]
    for i in dims:
        size = shape[i]
        st = [s[i] for s in strides_list]
        if groups and all(g == x * size for g, x in zip(groups[-1][1], st)):
            groups[-1] = [groups[-1][0] * size, st]
        else:
            groups.append([size, st])
    if not groups:
        return (1, 1), [(0, 0) for _ in strides_list]
    if len(groups) == 1:
        return (1, groups[0][0]), [(0, s) for s in groups[0][1]]
    if len(groups) == 2:
        return (groups[0][0], groups[1][0]), [(a, b) for a, b in zip(groups[0][1], groups[1][1])]
    return None


def _token_layout(lead, tensors):
    """``(B, L)`` and per-tensor ``(sB, sL)`` for tensors sharing the leading shape ``lead``
    (their leading strides); copies to contiguous only when the layout cannot be collapsed."""
    res = _collapse(lead, [t.stride()[:len(lead)] for t in tensors])
    if res is None:
        tensors = [t.contiguous() for t in tensors]
        res = _collapse(lead, [t.stride()[:len(lead)] for t in tensors])
    (B, L), strides = res
    return tensors, B, L, strides


OP_FWD, OP_HEAD_BWD = "pyobjectives_triton::rtd_loss_fwd", "pyobjectives_triton::rtd_loss_head_bwd"

# Registered ops (fake kernels, autograd) so that torch.compile / torch.export treat the launches as opaque.
_lib = torch.library.Library("pyobjectives_triton", "FRAGMENT")
_lib.define("rtd_loss_fwd(Tensor x, Tensor? w, Tensor? b, Tensor corrupted, Tensor original, Tensor? mask, "
            "float loss_weight, str reduction, bool need_x, bool need_w, bool need_b) "
            "-> (Tensor loss, Tensor stats, Tensor g, Tensor dw_sum, Tensor g_sum, Tensor denom)")
_lib.define("rtd_loss_head_bwd(Tensor g, Tensor s, Tensor w, Tensor? x, SymInt D, ScalarType dx_dtype, bool need_dx) "
            "-> (Tensor dx, Tensor dw)")


def _grad_plan(head, reduction, need_x, need_w, need_b):
    """What the forward pass keeps: ``g_t`` per token when d x needs it or when grad_out is per token;
    the mean / sum gradients of head_weight come from this pass's partial sums instead."""
    need_dw_fwd = head and need_w and reduction != "none"
    store_g = need_x or (reduction == "none" and head and (need_w or need_b))
    return need_dw_fwd, store_g


@torch.library.register_kernel(OP_FWD, ("cpu", "cuda"))
def _rtd_fwd(x, w, b, corrupted, original, mask, loss_weight, reduction, need_x, need_w, need_b):
    """``(loss, stats [5], g [T] or [0], sum_t g_t hidden_t [D] or [0], sum_t g_t [1], denom [] or [0])``."""
    head = w is not None
    lead = tuple(x.shape[:-1]) if head else tuple(x.shape)
    D = x.shape[-1] if head else 1
    T = 1
    for s in lead:
        T *= s
    dev = x.device
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    interp = _interpreting()
    cfg = _config(D, head, x.dtype, dev)
    n_chunks = max(1, triton.cdiv(D, cfg["BLOCK_D"]))
    n_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    P = max(1, min(n_blocks, cfg["max_programs"]))
    store_tok = reduction == "none"
    need_dw_fwd, store_g = _grad_plan(head, reduction, need_x, need_w, need_b)
    grad = store_g or need_dw_fwd or need_b

    masked = mask is not None
    m = mask if masked else corrupted
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    tensors, B, L, strides = _token_layout(lead, [x, corrupted, original, m])
    x, corrupted, original, m = tensors
    (sx0, sx1), (sc0, sc1), (so0, so1), (sm0, sm1) = strides
    sxd = x.stride(-1) if head and x.dim() > 0 else 0

    tok = new_output((T,), x.dtype, dev) if store_tok else None
    g = new_output((T,), acc, dev) if store_g else None
    part = new_output((P, _N_PARTIALS), torch.float64, dev)  # float64 partial sums: [P, 8] only
    dwp = new_output((P, D), acc, dev) if need_dw_fwd else None
    if T == 0:
        part.zero_()
        if dwp is not None:
            dwp.zero_()
    else:
        _rtd_fwd_kernel[(P,)](
            x, w if head else x, b if b is not None else x, corrupted, original, m,
            tok if tok is not None else part, g if g is not None else part, part,
            dwp if dwp is not None else part,
            T, L, D, n_blocks, sx0, sx1, sxd, sc0, sc1, so0, so1, sm0, sm1, float(loss_weight),
            HEAD=head, HAS_BIAS=b is not None, HAS_MASK=masked, STORE_TOK=store_tok, GRAD=grad, STORE_G=store_g,
            DW=need_dw_fwd, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], D_CHUNKS=n_chunks,
            ACC=_TL[acc], INTERP=interp, num_warps=cfg["num_warps"])
    sums = part.sum(0)  # float64 all the way: the scalar is rounded once
    count = sums[1]
    if reduction == "none":
        loss = tok.view(lead)
        denom = None
    elif reduction == "sum":
        loss = (sums[0] * loss_weight).to(x.dtype)
        denom = torch.ones((), dtype=torch.float64, device=dev)
    else:
        denom = count.clamp(min=1)
        loss = (sums[0] * loss_weight / denom).to(x.dtype)
    n_real, correct, tp, n_pred, n_repl = sums[1].float(), sums[2].float(), sums[3].float(), sums[4].float(), \
        sums[5].float()
    stats = torch.stack([correct / n_real.clamp(min=1), tp / n_pred.clamp(min=1), tp / n_repl.clamp(min=1),
                         n_repl, n_real])
    empty = lambda dtype: part.new_empty(0, dtype=dtype)  # noqa: E731  (outputs never alias each other)
    return (loss, stats, g if g is not None else empty(acc), dwp.sum(0) if dwp is not None else empty(acc),
            sums[6:7].clone(), denom if denom is not None else empty(torch.float64))


@torch.library.register_fake(OP_FWD)
def _rtd_fwd_fake(x, w, b, corrupted, original, mask, loss_weight, reduction, need_x, need_w, need_b):
    head = w is not None
    lead = tuple(x.shape[:-1]) if head else tuple(x.shape)
    T = math.prod(lead)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    need_dw_fwd, store_g = _grad_plan(head, reduction, need_x, need_w, need_b)
    f64 = dict(dtype=torch.float64)
    return (x.new_empty(lead if reduction == "none" else ()), x.new_empty(5, dtype=torch.float32),
            x.new_empty(T if store_g else 0, dtype=acc), x.new_empty(x.shape[-1] if need_dw_fwd else 0, dtype=acc),
            x.new_empty(1, **f64), x.new_empty(0 if reduction == "none" else (), **f64))


@torch.library.register_kernel(OP_HEAD_BWD, ("cpu", "cuda"))
def _rtd_head_bwd(g, s, w, x, D, dx_dtype, need_dx):
    """Fused head backward: ``d hidden [T, D]`` (if ``need_dx``) and, given ``x`` (per-token ``s``),
    ``sum_t s_t g_t hidden_t [D]``; empty tensors for what is not asked."""
    T, acc, dev = g.numel(), g.dtype, g.device
    cfg = _config(D, True, dx_dtype, dev)
    n_chunks = max(1, triton.cdiv(D, cfg["BLOCK_D"]))
    n_blocks = triton.cdiv(T, cfg["BLOCK_T"])
    P = max(1, min(n_blocks, cfg["max_programs"]))
    per_token_dw = x is not None
    if per_token_dw:
        (x,), _, L, ((sx0, sx1),) = _token_layout(tuple(x.shape[:-1]), [x])
        sxd = x.stride(-1)
    else:
        L, sx0, sx1, sxd = 1, 0, 0, 0
    dx_buf = new_output((T, D), dx_dtype, dev) if need_dx else None
    dwp_b = new_output((P, D), acc, dev) if per_token_dw else None
    if T > 0:
        _rtd_bwd_kernel[(P,)](
            g, s, 0 if s.numel() == 1 else 1, w, x if x is not None else g, dx_buf if dx_buf is not None else g,
            dwp_b if dwp_b is not None else g, T, L, D, n_blocks, sx0, sx1, sxd,
            DX=need_dx, DW=per_token_dw, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"],
            D_CHUNKS=n_chunks, ACC=_TL[acc], INTERP=_interpreting(), num_warps=cfg["num_warps"])
    elif dwp_b is not None:
        dwp_b.zero_()
    return (dx_buf if dx_buf is not None else g.new_empty(0, dtype=dx_dtype),
            dwp_b.sum(0) if dwp_b is not None else g.new_empty(0))


@torch.library.register_fake(OP_HEAD_BWD)
def _rtd_head_bwd_fake(g, s, w, x, D, dx_dtype, need_dx):
    return g.new_empty((g.shape[0], D) if need_dx else (0,), dtype=dx_dtype), g.new_empty(D if x is not None else 0)


def _rtd_setup(ctx, inputs, output):
    x, w, b, _, _, _, loss_weight, reduction, need_x, need_w, need_b = inputs
    _, _, g, dw_sum, g_sum, denom = output
    head = w is not None
    ctx.cfg = dict(head=head, lead=tuple(x.shape[:-1]) if head else tuple(x.shape), D=x.shape[-1] if head else 1,
                   reduction=reduction, loss_weight=float(loss_weight), need=(need_x, need_w, need_b),
                   dtypes=(x.dtype, None if w is None else w.dtype, None if b is None else b.dtype))
    # hidden is read again only for a per-token d head_weight
    ctx.save_for_backward(g, dw_sum, g_sum, denom, w, x if (head and reduction == "none" and need_w) else None)


def _rtd_backward(ctx, grad_loss, *_):
    g, dw_sum, gsum, denom, w, x = ctx.saved_tensors
    c = ctx.cfg
    need_x, need_w, need_b = c["need"]
    acc = g.dtype
    dx = dw = db = None
    none = (None,) * 8
    if c["reduction"] == "none":
        s = (grad_loss.to(acc) * c["loss_weight"]).reshape(-1).contiguous()
    else:
        s64 = grad_loss.to(torch.float64) * c["loss_weight"] / denom  # the scalar grads use it unrounded
        s = s64.to(acc).reshape(1)
    if not c["head"]:
        if need_x:
            dx = (g * (s if c["reduction"] == "none" else s[0])).to(c["dtypes"][0]).view(c["lead"])
        return (dx, None, None) + none
    per_token_dw = c["reduction"] == "none" and need_w
    if need_x or per_token_dw:
        dx_flat, dw_tok = torch.ops.pyobjectives_triton.rtd_loss_head_bwd(g, s, w, x, c["D"], c["dtypes"][0], need_x)
        if need_x:
            dx = dx_flat.view(c["lead"] + (c["D"],))
        if per_token_dw:
            dw = dw_tok.to(c["dtypes"][1])
    if need_w and not per_token_dw:
        dw = (dw_sum.to(torch.float64) * s64).to(c["dtypes"][1])
    if need_b:
        if c["reduction"] == "none":
            db = (g.to(torch.float64) * s).sum().to(c["dtypes"][2])
        else:
            db = (gsum[0] * s64).to(c["dtypes"][2])
    return (dx, dw, db) + none


torch.library.register_autograd(OP_FWD, _rtd_backward, setup_context=_rtd_setup)


_STAT_NAMES = ("accuracy", "precision", "recall", "replaced", "tokens")


def not_supported_reasons(inputs) -> list:
    reasons = []
    x = inputs["logits_or_hidden"]
    if x.dtype not in _FLOATS:
        reasons.append(f"logits_or_hidden dtype {x.dtype} is not one of float16, bfloat16, float32, float64")
    for name in ("head_weight", "head_bias"):
        t = inputs.get(name)
        if t is not None and t.dtype not in _FLOATS:
            reasons.append(f"{name} dtype {t.dtype} is not a supported float dtype")
    lead = x.shape[:-1] if inputs.get("head_weight") is not None else x.shape
    n = 1
    for s in lead:
        n *= s
    if n >= 2**31:
        reasons.append(f"{n} tokens: the kernel indexes tokens with int32 (at most 2**31 - 1)")
    return reasons


def rtd_loss(logits_or_hidden, corrupted_ids, original_ids, attention_mask=None, *, loss_weight=1.0,
             reduction="mean", head_weight=None, head_bias=None, return_stats=False):
    """Triton backend of :func:`pyobjectives.rtd_loss` (arguments already validated there)."""
    x, w, b = logits_or_hidden, head_weight, head_bias
    grad = torch.is_grad_enabled()
    need = (grad and x.requires_grad, grad and w is not None and w.requires_grad,
            grad and b is not None and b.requires_grad)
    loss, stats, *_ = torch.ops.pyobjectives_triton.rtd_loss_fwd(
        x, w, b, corrupted_ids, original_ids, attention_mask, float(loss_weight), reduction, *need)
    if not return_stats:
        return loss
    return loss, dict(zip(_STAT_NAMES, stats.detach().unbind(0)))  # metrics, not part of the graph
