"""Triton two-stream relative attention: forward and backward, every feature of the spec.

FlashAttention-style: online softmax with fp32 accumulation, the row max and log-sum saved
for the backward pass, probabilities recomputed there. Nothing of size
``B*H*Lq*Lk`` or ``B*H*Lq*R`` is materialised.

Work split
----------
Rows come in *row sets*, each inside one block of ``BM`` query positions
``[m0, m0 + BM)``:

* a content set: the ``BM`` content rows of that block;
* query chunks: up to ``BQ`` query-stream rows whose ``target_pos`` fall in that
  block (rows sorted by position, then cut per block, with tensor ops before launch).

One launch covers both kinds (the program's kind is a runtime branch), so the
query stream costs its P rows, not Lq. Because every row of a set lies in the
same position block, a (row set, key block ``[n0, n0 + BN)``) tile needs one
contiguous band of ``BM + BN - 1`` rows of ``r`` starting at
``Lq - (m0 + BM - 1) + n0``: ``bd = skew(Q @ R_band^T + r_r_bias . R_band)`` where the
skew picks column ``(m0 + BM - 1 - pos) + c`` for key ``n0 + c`` (``tl.gather``). The
bias products ``r_w_bias . k_j`` and ``r_r_bias . r_t`` are precomputed in fp32 per key
and per r row, so ``q + bias`` is never rounded to half precision.

Backward: ``delta = rowsum(dO * O)`` (from a float32 copy of O for half inputs), then three kernels that each
recompute P: dq (per row set, also dq's content / position parts for the bias
gradients and the per-row segment terms), dk/dv (per key block, over all row
sets of the batch) and dr (per block diagonal ``n_blk - m_blk``: all tiles on a
diagonal share one r band, so dr and the T5 per-distance gradient are summed in
registers and combined on the host in a fixed order). No atomics: every
reduction is deterministic.

T5 bias: the bucket of each relative distance is computed once per call with
the reference's function (``O(Lq + Lk)``), as a per-distance table ``[H, Lq+Lk-1]``
that tiles read along their diagonals; its gradient is reduced to the bucket
table with a one-hot matmul. This keeps buckets bit-identical to the reference
(no float ``log`` rounding differences at bucket edges).
"""

from __future__ import annotations

import math
import weakref

import torch
import triton
import triton.language as tl

from pyobjectives.reference.attention import t5_relative_bucket
from pyobjectives.reference.philox import seed_tensor, seed_value

from .utils import cast as _cast
from .utils import interpreting as _interpreting
from .utils import new_output

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 128


def _row_blocks() -> dict:
    """Row tile sizes. BM (content rows, and the position block that query chunks live in) is fixed
    per call because the host cuts query chunks by it; key tiles (BN) are autotuned."""
    # BM = 32 on the GPU: with BM = 64 the [BM, 2 BM] fp32 band tile plus the mask / T5 / dropout work
    # spill registers on sm_90 (ptxas: 0.5-3.5 KB per thread with all features), with 32 they mostly fit.
    return dict(BM=16, BQ=16) if _interpreting() else dict(BM=32, BQ=16)


def _key_configs():
    """Autotuning space for the key tile on H100/H200; one small config for the interpreter.
    BN <= BM keeps the r band within BAND = 2 * BM rows."""
    if _interpreting():
        return [triton.Config({"BN": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BN": bn}, num_warps=w, num_stages=st) for bn in (16, 32) for w in (4, 8) for st in (1, 2)]


def not_supported_reasons(inputs) -> list:
    q = inputs["q"]
    reasons = []
    if q.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"dtype {q.dtype} (triton supports float16, bfloat16, float32)")
    if q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}")
    return reasons


# ----------------------------------------------------------------------------------------
# shared tile math


@triton.jit
def _dot(a, b, DOT_PREC: tl.constexpr):
    """``a @ b`` with fp32 accumulation; "interpret-fp32" upcasts the operands first because the
    Triton interpreter miscomputes bfloat16 ``tl.dot`` (exact: bf16 -> fp32 is lossless)."""
    if DOT_PREC == "interpret-fp32":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PREC)


@triton.jit
def _to(x, DT: tl.constexpr, DOT_PREC: tl.constexpr):
    """``x.to(DT)`` rounded to nearest even. The interpreter's float32 -> bfloat16 cast truncates (DOT_PREC
    "interpret-fp32" marks bfloat16 under the interpreter), which pulled every rounded probability and
    gradient towards zero by up to an ulp; on a GPU this is the plain cast."""
    if DOT_PREC == "interpret-fp32":
        return _cast(x, DT, True)
    else:
        return x.to(DT)


@triton.jit
def _load_band(r_base, stride_rr, stride_rd, band_start, R, D, BAND: tl.constexpr, BD: tl.constexpr):
    t = band_start + tl.arange(0, BAND)
    d = tl.arange(0, BD)
    ok = (t >= 0) & (t < R)
    return tl.load(
        r_base + t[:, None] * stride_rr + d[None, :] * stride_rd, mask=ok[:, None] & (d[None, :] < D), other=0.0
    )


@triton.jit
def _tile_scores(
    xq, rw, rr, e0, e1, k, rband, pos, row_ok, qrank_row, segq_row, n0, m0, b, h, Lq, Lk, M, scale, wk_ptr, rrr_ptr,
    H, R, krank_ptr,
    s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr,
    s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, IS_CONTENT: tl.constexpr, HAS_RANK: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, SEG_IDS: tl.constexpr,
    SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
    BAND: tl.constexpr,
):
    """Scores ``s`` (fp32, before masking), visibility ``vis`` and "segments differ" of one tile."""
    offs_n = n0 + tl.arange(0, BN)
    differ = tl.zeros([xq.shape[0], BN], dtype=tl.int1)
    key_ok = offs_n < Lk
    # bias . k and bias . r come precomputed per key / per r row (fp32, O(B*H*L)); see _Launch.
    wk = tl.load(wk_ptr + (b * H + h) * Lk + offs_n, mask=key_ok, other=0.0)
    s = _dot(xq, tl.trans(k), DOT_PREC) + wk[None, :]
    if HAS_R:
        t = Lq - (m0 + BM - 1) + n0 + tl.arange(0, BAND)
        rrr = tl.load(rrr_ptr + (b * H + h) * R + t, mask=(t >= 0) & (t < R), other=0.0)
        band = _dot(xq, tl.trans(rband), DOT_PREC) + rrr[None, :]
        skew = (m0 + BM - 1 - pos)[:, None] + tl.arange(0, BN)[None, :]
        s += tl.gather(band, skew, axis=1)
    if SEG_IDS:
        segk = tl.load(segk_ptr + b * s_segk_b + offs_n, mask=key_ok, other=0)
        differ = segq_row[:, None] != segk[None, :]
        s += tl.where(differ, e1[:, None], e0[:, None])
    if SEG_DENSE:
        differ = (
            tl.load(
                segd_ptr + b * s_segd_b + pos[:, None] * s_segd_q + offs_n[None, :] * s_segd_k,
                mask=row_ok[:, None] & key_ok[None, :],
                other=0,
            )
            != 0
        )
        s += tl.where(differ, e1[:, None], e0[:, None])
    s = s * scale
    if HAS_T5:
        # per-distance table index j - (M + i) + (M + Lq - 1)
        rel = offs_n[None, :] - pos[:, None] + Lq - 1
        s += tl.load(t5_ptr + h * s_t5_h + rel * s_t5_r, mask=row_ok[:, None] & key_ok[None, :], other=0.0)

    vis = row_ok[:, None] & key_ok[None, :]
    if HAS_RANK:
        krank = tl.load(krank_ptr + b * s_krank_b + offs_n, mask=key_ok, other=0)
        vis = vis & (krank[None, :] < qrank_row[:, None])
    if HAS_DENSE:
        masked = tl.load(
            mask_ptr + b * s_mask_b + pos[:, None] * s_mask_q + offs_n[None, :] * s_mask_k,
            mask=row_ok[:, None] & key_ok[None, :],
            other=1,
        )
        vis = vis & (masked == 0)
    if HAS_KPM:
        pad = tl.load(kpm_ptr + b * s_kpm_b + offs_n * s_kpm_l, mask=key_ok, other=1)
        vis = vis & (pad[None, :] == 0)
    if CAUSAL:
        vis = vis & (offs_n[None, :] <= M + pos[:, None])
    if IS_CONTENT:
        if SEES_SELF:
            vis = vis | (row_ok[:, None] & (offs_n[None, :] == M + pos[:, None]))
    return s, vis, differ


@triton.jit
def _keep_scale(seed, drop_row_off, n0, dropout_p, BN: tl.constexpr):
    """Dropout factor keep / (1 - p) with Philox at offsets ``row_off + j`` (see reference/philox.py)."""
    offs = drop_row_off[:, None] + (n0 + tl.arange(0, BN))[None, :].to(tl.int64)
    keep = tl.rand(seed, offs) >= dropout_p
    return tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)


@triton.jit
def _row_set(
    b, h, m_blk, chunk_start, chunk_count, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, Lq, Lk, P, H, B,
    IS_CONTENT: tl.constexpr, ROWS: tl.constexpr, BM: tl.constexpr,
):
    """Rows of one set: (row index in its stream, position, valid, dropout row offset)."""
    if IS_CONTENT:
        rows = m_blk * BM + tl.arange(0, ROWS)
        row_ok = rows < Lq
        pos = tl.where(row_ok, rows, m_blk * BM)
        drop_off = ((b * H + h) * Lq + rows).to(tl.int64) * Lk
    else:
        idx = chunk_start + tl.arange(0, ROWS)
        row_ok = idx < chunk_start + chunk_count
        rows = tl.load(sorted_ptr + b * s_sorted_b + idx, mask=row_ok, other=0)
        pos = tl.load(tpos_ptr + b * s_tpos_b + rows * s_tpos_p, mask=row_ok, other=0).to(tl.int32)
        pos = tl.where(row_ok, pos, m_blk * BM)
        # int64 from the start; sizes equal to 1 arrive as constexpr and have no .to()
        stream_base = (tl.zeros([], dtype=tl.int64) + B) * H * Lq * Lk
        drop_off = stream_base + ((b * H + h) * P + rows).to(tl.int64) * Lk
    return rows, pos, row_ok, drop_off


@triton.jit
def _row_inputs(
    x_ptr, s_xb, s_xl, s_xh, s_xd, rows, row_ok, pos, b, h, D, rw_ptr, rr_ptr, rs_ptr, se_ptr, s_bias_h, s_se_s,
    s_se_h, qrank_ptr, s_qrank_b, segq_ptr, s_segq_b, HAS_RANK: tl.constexpr, HAS_SEG: tl.constexpr,
    SEG_IDS: tl.constexpr, BD: tl.constexpr,
):
    """Queries of a row set with the biases added, and the per-row segment / rank values."""
    d = tl.arange(0, BD)
    d_ok = d < D
    # The biases stay apart from the queries: (q + b).k = q.k + b.k with b.k computed per key in fp32,
    # so half-precision inputs never round the sum q + b (more accurate than eager, which does).
    xq = tl.load(
        x_ptr + b * s_xb + rows[:, None] * s_xl + h * s_xh + d[None, :] * s_xd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    x = xq.to(tl.float32)
    rw = tl.load(rw_ptr + h * s_bias_h + d, mask=d_ok, other=0.0).to(tl.float32)
    rr = tl.load(rr_ptr + h * s_bias_h + d, mask=d_ok, other=0.0).to(tl.float32)
    e0 = tl.zeros([x.shape[0]], dtype=tl.float32)
    e1 = tl.zeros([x.shape[0]], dtype=tl.float32)
    if HAS_SEG:
        rs = tl.load(rs_ptr + h * s_bias_h + d, mask=d_ok, other=0.0).to(tl.float32)
        se0 = tl.load(se_ptr + h * s_se_h + d, mask=d_ok, other=0.0).to(tl.float32)
        se1 = tl.load(se_ptr + s_se_s + h * s_se_h + d, mask=d_ok, other=0.0).to(tl.float32)
        qs = x + rs[None, :]
        e0 = tl.sum(qs * se0[None, :], axis=1)
        e1 = tl.sum(qs * se1[None, :], axis=1)
    qrank_row = tl.zeros([x.shape[0]], dtype=tl.int64)
    if HAS_RANK:
        qrank_row = tl.load(qrank_ptr + b * s_qrank_b + pos, mask=row_ok, other=0).to(tl.int64)
    segq_row = tl.zeros([x.shape[0]], dtype=tl.int64)
    if SEG_IDS:
        segq_row = tl.load(segq_ptr + b * s_segq_b + pos, mask=row_ok, other=0).to(tl.int64)
    return xq, rw, rr, e0, e1, qrank_row, segq_row


@triton.jit
def _probs(s, vis, row_max, row_logl, empty, row_ok, key_ok, Lk, EMPTY_UNIFORM: tl.constexpr):
    """Recomputed probabilities ``exp((s - max) - log(sum))``: the two statistics are kept apart because
    ``max + log(sum)`` rounded to one float32 is off by up to half an ulp of the max (5e-4 at scores of
    1e4), which every recomputed probability would inherit. An empty row has max = +inf (all zero) or,
    with "uniform", 1/Lk."""
    p = tl.where(vis, tl.exp((s - row_max[:, None]) - row_logl[:, None]), 0.0)
    if EMPTY_UNIFORM:
        p = tl.where(empty[:, None] & row_ok[:, None] & key_ok[None, :], 1.0 / Lk, p)
    return p


@triton.jit
def _unskew(ds, pos, m0, BM: tl.constexpr, BN: tl.constexpr, BAND: tl.constexpr):
    """Inverse of the bd skew: tile ``[rows, BN]`` back onto the band ``[rows, BAND]`` (zeros elsewhere)."""
    c = tl.arange(0, BAND)[None, :] - (m0 + BM - 1 - pos)[:, None]
    ok = (c >= 0) & (c < BN)
    return tl.where(ok, tl.gather(ds, tl.where(ok, c, 0), axis=1), 0.0)


# The long argument list every kernel shares, in one order (see _launch_args on the host).
#   inputs: q, k, v, r, biases, q_g and their strides; row sets; masks; segments; t5; dropout; sizes.


@triton.jit
def _fwd_rows(
    b, h, m_blk, c_start, c_count, x_ptr, s_xb, s_xl, s_xh, s_xd, o_ptr, s_ob, s_ol, s_oh, s_od, lse_ptr,
    s_lse_b, s_lse_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd,
    rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b, tpos_ptr,
    s_tpos_b, s_tpos_p,
    qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b,
    mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed,
    dropout_p, scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT: tl.constexpr, ROWS: tl.constexpr, HAS_RANK: tl.constexpr,
    HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, SEG_IDS: tl.constexpr,
    SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr, EMPTY_UNIFORM: tl.constexpr,
    DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BAND: tl.constexpr,
):
    rows, pos, row_ok, drop_off = _row_set(
        b, h, m_blk, c_start, c_count, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, Lq, Lk, P, H, B,
        IS_CONTENT, ROWS, BM,
    )
    xq, rw, rr, e0, e1, qrank_row, segq_row = _row_inputs(
        x_ptr, s_xb, s_xl, s_xh, s_xd, rows, row_ok, pos, b, h, D, rw_ptr, rr_ptr, rs_ptr, se_ptr, s_bias_h, s_se_s,
        s_se_h, qrank_ptr, s_qrank_b, segq_ptr, s_segq_b, HAS_RANK, SEG_IDS or SEG_DENSE, SEG_IDS, BD,
    )
    m0 = m_blk * BM
    d = tl.arange(0, BD)
    d_ok = d < D
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BD], dtype=tl.float32)
    for n0 in range(0, Lk, BN):
        offs_n = n0 + tl.arange(0, BN)
        key_ok = offs_n < Lk
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * s_kb + offs_n[:, None] * s_kl + h * s_kh + d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * s_vb + offs_n[:, None] * s_vl + h * s_vh + d[None, :] * s_vd, mask=kv_mask, other=0.0)
        rband = k  # placeholder: read only with HAS_R
        if HAS_R:
            rband = _load_band(r_ptr + b * s_rb + h * s_rh, s_rr, s_rd, Lq - (m0 + BM - 1) + n0, R, D, BAND, BD)
        s, vis, differ = _tile_scores(
            xq, rw, rr, e0, e1, k, rband, pos, row_ok, qrank_row, segq_row, n0, m0, b, h, Lq, Lk, M, scale, wk_ptr,
            rrr_ptr, H, R, krank_ptr,
            s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k,
            segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, IS_CONTENT, HAS_RANK, HAS_DENSE, HAS_KPM,
            CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, DOT_PREC, BM, BN, BAND,
        )
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            p = p * _keep_scale(seed, drop_off, n0, dropout_p, BN)
        acc = acc * alpha[:, None] + _dot(_to(p, v.dtype, DOT_PREC), v, DOT_PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if EMPTY_UNIFORM:
        if tl.max(empty.to(tl.int32), axis=0) > 0:
            # HF's -1e30 fill: a row with no visible key averages all values (dropout still applies).
            acc_u = tl.zeros([ROWS, BD], dtype=tl.float32)
            for n0 in range(0, Lk, BN):
                offs_n = n0 + tl.arange(0, BN)
                key_ok = offs_n < Lk
                v = tl.load(
                    v_ptr + b * s_vb + offs_n[:, None] * s_vl + h * s_vh + d[None, :] * s_vd,
                    mask=key_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                pu = tl.where(row_ok[:, None] & key_ok[None, :], 1.0 / Lk, 0.0)
                if HAS_DROPOUT:
                    pu = pu * _keep_scale(seed, drop_off, n0, dropout_p, BN)
                acc_u += _dot(_to(pu, v.dtype, DOT_PREC), v, DOT_PREC)
            out = tl.where(empty[:, None], acc_u, out)
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(
        o_ptr + b * s_ob + rows[:, None] * s_ol + h * s_oh + d[None, :] * s_od,
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    stats = lse_ptr + b * s_lse_b + h * s_lse_h + 2 * rows
    tl.store(stats, tl.where(empty, float("inf"), m_fin), mask=row_ok)
    tl.store(stats + 1, tl.where(empty, 0.0, tl.log(tl.where(empty, 1.0, l_i))), mask=row_ok)


@triton.jit
def _bwd_rows_setup(
    b, h, m_blk, c_start, c_count, x_ptr, s_xb, s_xl, s_xh, s_xd, do_ptr, s_dob, s_dol, s_doh, s_dod, lse_ptr,
    delta_ptr, s_lse_b, s_lse_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr,
    s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b,
    tpos_ptr, s_tpos_b,
    s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr,
    s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r,
    seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT: tl.constexpr, ROWS: tl.constexpr,
    HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BAND: tl.constexpr,
):
    """Everything a backward kernel needs about one row set: positions, biased queries, dO, lse, delta."""
    rows, pos, row_ok, drop_off = _row_set(
        b, h, m_blk, c_start, c_count, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, Lq, Lk, P, H, B,
        IS_CONTENT, ROWS, BM,
    )
    xq, rw, rr, e0, e1, qrank_row, segq_row = _row_inputs(
        x_ptr, s_xb, s_xl, s_xh, s_xd, rows, row_ok, pos, b, h, D, rw_ptr, rr_ptr, rs_ptr, se_ptr, s_bias_h, s_se_s,
        s_se_h, qrank_ptr, s_qrank_b, segq_ptr, s_segq_b, HAS_RANK, SEG_IDS or SEG_DENSE, SEG_IDS, BD,
    )
    d = tl.arange(0, BD)
    do = tl.load(
        do_ptr + b * s_dob + rows[:, None] * s_dol + h * s_doh + d[None, :] * s_dod,
        mask=row_ok[:, None] & (d[None, :] < D),
        other=0.0,
    )
    stats = lse_ptr + b * s_lse_b + h * s_lse_h + 2 * rows
    row_max = tl.load(stats, mask=row_ok, other=float("inf"))
    row_logl = tl.load(stats + 1, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + b * s_lse_b + h * s_lse_h + 2 * rows, mask=row_ok, other=0.0)
    return rows, pos, row_ok, drop_off, xq, rw, rr, e0, e1, qrank_row, segq_row, do, row_max, row_logl, delta


@triton.jit
def _bwd_tile(
    xq, rw, rr, e0, e1, k, v, rband, pos, row_ok, qrank_row, segq_row, do, row_max, row_logl, delta, drop_off, n0, m0, b, h, k_ptr,
    s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr,
    s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p,
    qrank_ptr, s_qrank_b,
    krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b,
    s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H,
    Lq, Lk, M, R, P, D, IS_CONTENT: tl.constexpr, HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr, BAND: tl.constexpr,
):
    """Recompute one tile: probabilities after dropout ``pd`` and dL/dscore ``ds`` (plus "segments differ")."""
    s, vis, differ = _tile_scores(
        xq, rw, rr, e0, e1, k, rband, pos, row_ok, qrank_row, segq_row, n0, m0, b, h, Lq, Lk, M, scale, wk_ptr,
        rrr_ptr, H, R, krank_ptr,
        s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr,
        s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, IS_CONTENT, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL,
        SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, DOT_PREC, BM, BN, BAND,
    )
    key_ok = (n0 + tl.arange(0, BN)) < Lk
    p = _probs(s, vis, row_max, row_logl, row_max == float("inf"), row_ok, key_ok, Lk, EMPTY_UNIFORM)
    dp = _dot(do, tl.trans(v), DOT_PREC)
    pd = p
    if HAS_DROPOUT:
        keep = _keep_scale(seed, drop_off, n0, dropout_p, BN)
        pd = p * keep
        dp = dp * keep
    ds = p * (dp - delta[:, None])
    return pd, ds, differ


@triton.jit
def _load_kv(
    b, h, n0, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, Lk, D, BN: tl.constexpr, BD: tl.constexpr
):
    offs_n = n0 + tl.arange(0, BN)
    d = tl.arange(0, BD)
    kv_mask = (offs_n < Lk)[:, None] & (d < D)[None, :]
    k = tl.load(k_ptr + b * s_kb + offs_n[:, None] * s_kl + h * s_kh + d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * s_vb + offs_n[:, None] * s_vl + h * s_vh + d[None, :] * s_vd, mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def _dq_rows(
    pid, b, h, m_blk, c_start, c_count, x_ptr, s_xb, s_xl, s_xh, s_xd, do_ptr, s_dob, s_dol, s_doh, s_dod, lse_ptr,
    delta_ptr, s_lse_b, s_lse_h, dx_ptr, s_dxb, s_dxl, s_dxh, s_dxd, de_ptr, s_de_b, s_de_h, bias_part_ptr, k_ptr,
    s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr,
    s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p,
    qrank_ptr, s_qrank_b,
    krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b,
    s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H,
    Lq, Lk, M, R, P, D, IS_CONTENT: tl.constexpr, ROWS: tl.constexpr, HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr,
    HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr, BAND: tl.constexpr,
):
    rows, pos, row_ok, drop_off, xq, rw, rr, e0, e1, qrank_row, segq_row, do, row_max, row_logl, delta = _bwd_rows_setup(
        b, h, m_blk, c_start, c_count, x_ptr, s_xb, s_xl, s_xh, s_xd, do_ptr, s_dob, s_dol, s_doh, s_dod, lse_ptr,
        delta_ptr, s_lse_b, s_lse_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr,
        s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr,
        s_sorted_b, tpos_ptr,
        s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b,
        segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr,
        s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT, ROWS, HAS_RANK, HAS_DENSE,
        HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM, DOT_PREC, BM, BN, BD, BAND,
    )
    m0 = m_blk * BM
    d = tl.arange(0, BD)
    d_ok = d < D
    acc_ac = tl.zeros([ROWS, BD], dtype=tl.float32)
    acc_bd = tl.zeros([ROWS, BD], dtype=tl.float32)
    de0 = tl.zeros([ROWS], dtype=tl.float32)
    de1 = tl.zeros([ROWS], dtype=tl.float32)
    for n0 in range(0, Lk, BN):
        k, v = _load_kv(b, h, n0, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, Lk, D, BN, BD)
        rband = k  # placeholder: read only with HAS_R
        if HAS_R:
            rband = _load_band(r_ptr + b * s_rb + h * s_rh, s_rr, s_rd, Lq - (m0 + BM - 1) + n0, R, D, BAND, BD)
        pd, ds, differ = _bwd_tile(
            xq, rw, rr, e0, e1, k, v, rband, pos, row_ok, qrank_row, segq_row, do, row_max, row_logl, delta, drop_off, n0, m0, b, h,
            k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr,
            rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b, tpos_ptr,
            s_tpos_b, s_tpos_p,
            qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr,
            s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h,
            s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT, HAS_RANK, HAS_DENSE, HAS_KPM,
            CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM, DOT_PREC, BM, BN, BD, BAND,
        )
        dsc = ds * scale
        acc_ac += _dot(_to(dsc, k.dtype, DOT_PREC), k, DOT_PREC)
        if HAS_R:
            acc_bd += _dot(_to(_unskew(dsc, pos, m0, BM, BN, BAND), rband.dtype, DOT_PREC), rband, DOT_PREC)
        if SEG_IDS or SEG_DENSE:
            de1 += tl.sum(tl.where(differ, dsc, 0.0), axis=1)
            de0 += tl.sum(tl.where(differ, 0.0, dsc), axis=1)
    dq = acc_ac + acc_bd
    if SEG_IDS or SEG_DENSE:
        se0 = tl.load(se_ptr + h * s_se_h + d, mask=d_ok, other=0.0).to(tl.float32)
        se1 = tl.load(se_ptr + s_se_s + h * s_se_h + d, mask=d_ok, other=0.0).to(tl.float32)
        dq += de0[:, None] * se0[None, :] + de1[:, None] * se1[None, :]
        tl.store(de_ptr + b * s_de_b + h * s_de_h + rows * 2, de0, mask=row_ok)
        tl.store(de_ptr + b * s_de_b + h * s_de_h + rows * 2 + 1, de1, mask=row_ok)
    tl.store(
        dx_ptr + b * s_dxb + rows[:, None] * s_dxl + h * s_dxh + d[None, :] * s_dxd,
        _to(dq, dx_ptr.dtype.element_ty, DOT_PREC),
        mask=row_ok[:, None] & d_ok[None, :],
    )
    # per-program sums of the content / position parts of dq: r_w_bias and r_r_bias gradients
    part = bias_part_ptr + (pid * H + h) * 2 * BD
    tl.store(part + d, tl.sum(acc_ac, axis=0))
    tl.store(part + BD + d, tl.sum(acc_bd, axis=0))


@triton.jit
def _dq_kernel(
    chunks_ptr, n_content, n_mb, q_ptr, s_qb, s_ql, s_qh, s_qd, doh_ptr, s_dohb, s_dohl, s_dohh, s_dohd, lseh_ptr,
    deltah_ptr, s_lseh_b, s_lseh_h, qg_ptr, s_gb, s_gl, s_gh, s_gd, dog_ptr, s_dogb, s_dogl, s_dogh, s_dogd, lseg_ptr,
    deltag_ptr, s_lseg_b, s_lseg_h, dq_ptr, s_dqb, s_dql, s_dqh, s_dqd, dqg_ptr, s_dqgb, s_dqgl, s_dqgh, s_dqgd,
    deh_ptr, s_deh_b, s_deh_h, deg_ptr, s_deg_b, s_deg_h, bias_part_ptr, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb,
    s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr,
    s_se_s, s_se_h,
    sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr,
    s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr,
    s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D,
    HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BAND: tl.constexpr, BQ: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid < n_content:
        _dq_rows(
            pid, pid // n_mb, h, pid % n_mb, 0, 0, q_ptr, s_qb, s_ql, s_qh, s_qd, doh_ptr, s_dohb, s_dohl, s_dohh,
            s_dohd, lseh_ptr, deltah_ptr, s_lseh_b, s_lseh_h, dq_ptr, s_dqb, s_dql, s_dqh, s_dqd, deh_ptr, s_deh_b,
            s_deh_h, bias_part_ptr, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr,
            s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr,
            s_sorted_b, tpos_ptr,
            s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr,
            s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q,
            s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, True, BM, HAS_RANK,
            HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM, DOT_PREC, BM, BN, BD,
            BAND,
        )
    else:
        c = chunks_ptr + (pid - n_content) * 4
        _dq_rows(
            pid, tl.load(c), h, tl.load(c + 1), tl.load(c + 2), tl.load(c + 3), qg_ptr, s_gb, s_gl, s_gh, s_gd,
            dog_ptr, s_dogb, s_dogl, s_dogh, s_dogd, lseg_ptr, deltag_ptr, s_lseg_b, s_lseg_h, dqg_ptr, s_dqgb,
            s_dqgl, s_dqgh, s_dqgd, deg_ptr, s_deg_b, s_deg_h, bias_part_ptr, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr,
            s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr,
            se_ptr, s_se_s,
            s_se_h, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b,
            kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k,
            segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M,
            R, P, D, False, BQ, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT,
            EMPTY_UNIFORM, DOT_PREC, BM, BN, BD, BAND,
        )


@triton.jit
def _kv_rows(
    dk, dv, k, v, n0, b, h, m_blk, c_start, c_count, x_ptr, s_xb, s_xl, s_xh, s_xd, do_ptr, s_dob, s_dol, s_doh,
    s_dod, lse_ptr, delta_ptr, s_lse_b, s_lse_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr,
    s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr,
    s_sorted_b,
    tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr,
    s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k,
    t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT: tl.constexpr,
    ROWS: tl.constexpr, HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BAND: tl.constexpr,
):
    rows, pos, row_ok, drop_off, xq, rw, rr, e0, e1, qrank_row, segq_row, do, row_max, row_logl, delta = _bwd_rows_setup(
        b, h, m_blk, c_start, c_count, x_ptr, s_xb, s_xl, s_xh, s_xd, do_ptr, s_dob, s_dol, s_doh, s_dod, lse_ptr,
        delta_ptr, s_lse_b, s_lse_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr,
        s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr,
        s_sorted_b, tpos_ptr,
        s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b,
        segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr,
        s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT, ROWS, HAS_RANK, HAS_DENSE,
        HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM, DOT_PREC, BM, BN, BD, BAND,
    )
    m0 = m_blk * BM
    rband = k  # placeholder: read only with HAS_R
    if HAS_R:
        rband = _load_band(r_ptr + b * s_rb + h * s_rh, s_rr, s_rd, Lq - (m0 + BM - 1) + n0, R, D, BAND, BD)
    pd, ds, differ = _bwd_tile(
        xq, rw, rr, e0, e1, k, v, rband, pos, row_ok, qrank_row, segq_row, do, row_max, row_logl, delta, drop_off, n0, m0, b, h,
        k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr,
        rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b,
        s_tpos_p, qrank_ptr,
        s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr,
        s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p,
        scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF,
        HAS_DROPOUT, EMPTY_UNIFORM, DOT_PREC, BM, BN, BD, BAND,
    )
    dv += _dot(tl.trans(_to(pd, do.dtype, DOT_PREC)), do, DOT_PREC)
    dsc = ds * scale
    dk += _dot(tl.trans(_to(dsc, xq.dtype, DOT_PREC)), xq, DOT_PREC) + tl.sum(dsc, axis=0)[:, None] * rw[None, :]
    return dk, dv


@triton.jit
def _dkdv_kernel(
    chunks_ptr, chunk_ptr_ptr, n_mb, q_ptr, s_qb, s_ql, s_qh, s_qd, doh_ptr, s_dohb, s_dohl, s_dohh, s_dohd, lseh_ptr,
    deltah_ptr, s_lseh_b, s_lseh_h, qg_ptr, s_gb, s_gl, s_gh, s_gd, dog_ptr, s_dogb, s_dogl, s_dogh, s_dogd, lseg_ptr,
    deltag_ptr, s_lseg_b, s_lseg_h, dk_ptr, s_dkb, s_dkl, s_dkh, s_dkd, dv_ptr, s_dvb, s_dvl, s_dvh, s_dvd, k_ptr,
    s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr,
    s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p,
    qrank_ptr, s_qrank_b,
    krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b,
    s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H,
    Lq, Lk, M, R, P, D, HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BAND: tl.constexpr, BQ: tl.constexpr,
):
    n0 = tl.program_id(0) * BN
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    k, v = _load_kv(b, h, n0, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, Lk, D, BN, BD)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    for m_blk in range(0, n_mb):
        dk, dv = _kv_rows(
            dk, dv, k, v, n0, b, h, m_blk, 0, 0, q_ptr, s_qb, s_ql, s_qh, s_qd, doh_ptr, s_dohb, s_dohl, s_dohh,
            s_dohd, lseh_ptr, deltah_ptr, s_lseh_b, s_lseh_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh,
            s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s,
            s_se_h, sorted_ptr,
            s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b,
            s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr,
            s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D,
            True, BM, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM,
            DOT_PREC, BM, BN, BD, BAND,
        )
    for c in range(tl.load(chunk_ptr_ptr + b), tl.load(chunk_ptr_ptr + b + 1)):
        dk, dv = _kv_rows(
            dk, dv, k, v, n0, b, h, tl.load(chunks_ptr + c * 4 + 1), tl.load(chunks_ptr + c * 4 + 2),
            tl.load(chunks_ptr + c * 4 + 3), qg_ptr, s_gb, s_gl, s_gh, s_gd, dog_ptr, s_dogb, s_dogl, s_dogh, s_dogd,
            lseg_ptr, deltag_ptr, s_lseg_b, s_lseg_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd,
            r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h,
            sorted_ptr,
            s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b,
            s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr,
            s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D,
            False, BQ, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM,
            DOT_PREC, BM, BN, BD, BAND,
        )
    offs_n = n0 + tl.arange(0, BN)
    d = tl.arange(0, BD)
    ok = (offs_n < Lk)[:, None] & (d < D)[None, :]
    tl.store(
        dk_ptr + b * s_dkb + offs_n[:, None] * s_dkl + h * s_dkh + d[None, :] * s_dkd,
        _to(dk, dk_ptr.dtype.element_ty, DOT_PREC),
        mask=ok,
    )
    tl.store(
        dv_ptr + b * s_dvb + offs_n[:, None] * s_dvl + h * s_dvh + d[None, :] * s_dvd,
        _to(dv, dv_ptr.dtype.element_ty, DOT_PREC),
        mask=ok,
    )


@triton.jit
def _dr_rows(
    dr, dt, rband, diag, b, h, m_blk, c_start, c_count, x_ptr, s_xb, s_xl, s_xh, s_xd, do_ptr, s_dob, s_dol, s_doh,
    s_dod, lse_ptr, delta_ptr, s_lse_b, s_lse_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr,
    s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr,
    s_sorted_b,
    tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr,
    s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k,
    t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT: tl.constexpr,
    ROWS: tl.constexpr, HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BAND: tl.constexpr,
):
    rows, pos, row_ok, drop_off, xq, rw, rr, e0, e1, qrank_row, segq_row, do, row_max, row_logl, delta = _bwd_rows_setup(
        b, h, m_blk, c_start, c_count, x_ptr, s_xb, s_xl, s_xh, s_xd, do_ptr, s_dob, s_dol, s_doh, s_dod, lse_ptr,
        delta_ptr, s_lse_b, s_lse_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr,
        s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr,
        s_sorted_b, tpos_ptr,
        s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b,
        segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr,
        s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT, ROWS, HAS_RANK, HAS_DENSE,
        HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM, DOT_PREC, BM, BN, BD, BAND,
    )
    m0 = m_blk * BM
    n0 = m0 + diag * BN
    k, v = _load_kv(b, h, n0, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, Lk, D, BN, BD)
    pd, ds, differ = _bwd_tile(
        xq, rw, rr, e0, e1, k, v, rband, pos, row_ok, qrank_row, segq_row, do, row_max, row_logl, delta, drop_off, n0, m0, b, h,
        k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr,
        rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b,
        s_tpos_p, qrank_ptr,
        s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr,
        s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p,
        scale, B, H, Lq, Lk, M, R, P, D, IS_CONTENT, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF,
        HAS_DROPOUT, EMPTY_UNIFORM, DOT_PREC, BM, BN, BD, BAND,
    )
    dband = _unskew(ds, pos, m0, BM, BN, BAND)
    if HAS_T5:
        dt += tl.sum(dband, axis=0)
    if HAS_R:
        dband = dband * scale
        dr += _dot(tl.trans(_to(dband, xq.dtype, DOT_PREC)), xq, DOT_PREC) + tl.sum(dband, axis=0)[:, None] * rr[None, :]
    return dr, dt


@triton.jit
def _dr_kernel(
    chunks_ptr, chunk_ptr_ptr, n_mb, n_nb, q_ptr, s_qb, s_ql, s_qh, s_qd, doh_ptr, s_dohb, s_dohl, s_dohh, s_dohd,
    lseh_ptr, deltah_ptr, s_lseh_b, s_lseh_h, qg_ptr, s_gb, s_gl, s_gh, s_gd, dog_ptr, s_dogb, s_dogl, s_dogh, s_dogd,
    lseg_ptr, deltag_ptr, s_lseg_b, s_lseg_h, dr_part_ptr, dt_part_ptr, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb,
    s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr,
    s_se_s, s_se_h,
    sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr,
    s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr,
    s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D,
    HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
    BAND: tl.constexpr, BQ: tl.constexpr,
):
    """One program per block diagonal (n_blk - m_blk): its tiles share one r band (BN == BM here).
    Without r it only sums the T5 per-distance gradient."""
    i_diag = tl.program_id(0)
    diag = i_diag - (n_mb - 1)
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    rband = tl.zeros([BAND, BD], dtype=tl.float32)  # placeholder: read only with HAS_R
    if HAS_R:
        rband = _load_band(r_ptr + b * s_rb + h * s_rh, s_rr, s_rd, Lq - (BM - 1) + diag * BN, R, D, BAND, BD)
    dr = tl.zeros([BAND, BD], dtype=tl.float32)
    dt = tl.zeros([BAND], dtype=tl.float32)
    for m_blk in range(tl.maximum(0, -diag), tl.minimum(n_mb, n_nb - diag)):
        dr, dt = _dr_rows(
            dr, dt, rband, diag, b, h, m_blk, 0, 0, q_ptr, s_qb, s_ql, s_qh, s_qd, doh_ptr, s_dohb, s_dohl, s_dohh,
            s_dohd, lseh_ptr, deltah_ptr, s_lseh_b, s_lseh_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh,
            s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s,
            s_se_h, sorted_ptr,
            s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b,
            s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr,
            s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D,
            True, BM, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM,
            DOT_PREC, BM, BN, BD, BAND,
        )
    for c in range(tl.load(chunk_ptr_ptr + b), tl.load(chunk_ptr_ptr + b + 1)):
        m_blk = tl.load(chunks_ptr + c * 4 + 1)
        if (m_blk + diag >= 0) & (m_blk + diag < n_nb):
            dr, dt = _dr_rows(
                dr, dt, rband, diag, b, h, m_blk, tl.load(chunks_ptr + c * 4 + 2), tl.load(chunks_ptr + c * 4 + 3),
                qg_ptr, s_gb, s_gl, s_gh, s_gd, dog_ptr, s_dogb, s_dogl, s_dogh, s_dogd, lseg_ptr, deltag_ptr,
                s_lseg_b, s_lseg_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr,
                s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr,
                s_sorted_b,
                tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l,
                segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b,
                s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, False,
                BQ, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM,
                DOT_PREC, BM, BN, BD, BAND,
            )
    base = (b * H + h) * (n_mb + n_nb - 1) + i_diag
    w = tl.arange(0, BAND)
    d = tl.arange(0, BD)
    tl.store(dr_part_ptr + base * BAND * BD + w[:, None] * BD + d[None, :], dr)
    tl.store(dt_part_ptr + base * BAND + w, dt)


@triton.jit
def _delta_kernel(
    do_ptr, s_dob, s_dol, s_doh, s_dod, o_ptr, s_ob, s_ol, s_oh, s_od, delta_ptr, s_delta_b, s_delta_h, L, D, n_lb,
    ROWS: tl.constexpr, BD: tl.constexpr,
):
    """``delta = rowsum(dO * O)`` as the diagonal of ``dO @ O^T``: the backward kernels form
    ``dp = dO @ v^T`` with a dot of the same shape, so on a row with one visible key (O equals that
    key's value) delta equals dp (bit for bit where both dots sum alike: float32 inputs, the
    interpreter) and the row's score gradient is 0, as autograd's. A host row sum rounds in another
    order, and the gradient multiplies that difference by |k|."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = pid // n_lb
    rows = (pid % n_lb) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, BD)
    mask = (rows < L)[:, None] & (d < D)[None, :]
    do = tl.load(do_ptr + b * s_dob + rows[:, None] * s_dol + h * s_doh + d[None, :] * s_dod, mask=mask, other=0.0)
    o = tl.load(o_ptr + b * s_ob + rows[:, None] * s_ol + h * s_oh + d[None, :] * s_od, mask=mask, other=0.0)
    # O is float32 (the output's float32 copy for half inputs): exact products, no rounding of O
    prod = tl.dot(do.to(tl.float32), tl.trans(o.to(tl.float32)), input_precision="ieee")
    same = tl.arange(0, ROWS)[:, None] == tl.arange(0, ROWS)[None, :]
    delta = tl.sum(tl.where(same, prod, 0.0), axis=1)
    tl.store(delta_ptr + b * s_delta_b + h * s_delta_h + 2 * rows, delta, mask=rows < L)


@triton.jit
def _fwd_kernel(
    chunks_ptr, n_content, n_mb, q_ptr, s_qb, s_ql, s_qh, s_qd, qg_ptr, s_gb, s_gl, s_gh, s_gd, oh_ptr, s_ohb, s_ohl,
    s_ohh, s_ohd, og_ptr, s_ogb, s_ogl, s_ogh, s_ogd, lseh_ptr, s_lseh_b, s_lseh_h, lseg_ptr, s_lseg_b, s_lseg_h,
    k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr,
    rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p,
    qrank_ptr,
    s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr,
    s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p,
    scale, B, H, Lq, Lk, M, R, P, D, HAS_RANK: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_KPM: tl.constexpr,
    CAUSAL: tl.constexpr, SEG_IDS: tl.constexpr, SEG_DENSE: tl.constexpr, HAS_T5: tl.constexpr, HAS_R: tl.constexpr, SEES_SELF: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, EMPTY_UNIFORM: tl.constexpr, DOT_PREC: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr, BD: tl.constexpr, BAND: tl.constexpr, BQ: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    if pid < n_content:
        _fwd_rows(
            pid // n_mb, h, pid % n_mb, 0, 0, q_ptr, s_qb, s_ql, s_qh, s_qd, oh_ptr, s_ohb, s_ohl, s_ohh, s_ohd,
            lseh_ptr, s_lseh_b, s_lseh_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr, s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb,
            s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr, se_ptr, s_se_s, s_se_h, sorted_ptr,
            s_sorted_b,
            tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b, kpm_ptr, s_kpm_b, s_kpm_l,
            segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k, segd_ptr, s_segd_b,
            s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M, R, P, D, True, BM,
            HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT, EMPTY_UNIFORM, DOT_PREC,
            BM, BN, BD, BAND,
        )
    else:
        c = chunks_ptr + (pid - n_content) * 4
        _fwd_rows(
            tl.load(c), h, tl.load(c + 1), tl.load(c + 2), tl.load(c + 3), qg_ptr, s_gb, s_gl, s_gh, s_gd,
            og_ptr, s_ogb, s_ogl, s_ogh, s_ogd, lseg_ptr, s_lseg_b, s_lseg_h, k_ptr, s_kb, s_kl, s_kh, s_kd, v_ptr,
            s_vb, s_vl, s_vh, s_vd, r_ptr, s_rb, s_rr, s_rh, s_rd, rw_ptr, rr_ptr, rs_ptr, s_bias_h, wk_ptr, rrr_ptr,
            se_ptr, s_se_s,
            s_se_h, sorted_ptr, s_sorted_b, tpos_ptr, s_tpos_b, s_tpos_p, qrank_ptr, s_qrank_b, krank_ptr, s_krank_b,
            kpm_ptr, s_kpm_b, s_kpm_l, segq_ptr, s_segq_b, segk_ptr, s_segk_b, mask_ptr, s_mask_b, s_mask_q, s_mask_k,
            segd_ptr, s_segd_b, s_segd_q, s_segd_k, t5_ptr, s_t5_h, s_t5_r, seed, dropout_p, scale, B, H, Lq, Lk, M,
            R, P, D, False, BQ, HAS_RANK, HAS_DENSE, HAS_KPM, CAUSAL, SEG_IDS, SEG_DENSE, HAS_T5, HAS_R, SEES_SELF, HAS_DROPOUT,
            EMPTY_UNIFORM, DOT_PREC, BM, BN, BD, BAND,
        )


# Autotuned entry points (key: the shapes that change the best tile); outputs are fully rewritten
# on every run, so benchmarking a config has no side effects.
_TUNE_KEY = ["Lk", "D", "P"]
_fwd_kernel = triton.autotune(configs=_key_configs(), key=_TUNE_KEY)(_fwd_kernel)
_dq_kernel = triton.autotune(configs=_key_configs(), key=_TUNE_KEY)(_dq_kernel)
_dkdv_kernel = triton.autotune(configs=_key_configs(), key=_TUNE_KEY)(_dkdv_kernel)


# ----------------------------------------------------------------------------------------
# host side


def _dot_precision(dtype):
    """fp32 inputs get exact IEEE products (tf32 would miss the fp32 tolerance); half types use tensor cores."""
    if dtype == torch.float32:
        return "ieee"
    return "interpret-fp32" if _interpreting() and dtype == torch.bfloat16 else "tf32"


def _strides(t, n):
    return tuple(t.stride()) if t is not None else (0,) * n


_chunk_cache: tuple = (None, -1, None, None)


def _padding_rows(target_pos, Lq):
    """Query rows outside every chunk: -1 marks padding, and a position outside ``[0, Lq)`` (not value-checked
    on accelerators) is treated alike, so that no kernel indexes with it."""
    return (target_pos < 0) | (target_pos >= Lq)


def _query_chunks(target_pos, Lq, BM, BQ):
    """Sort query rows by position and cut them into chunks of <= BQ rows inside one BM position block.

    Returns ``sorted_rows [B, P]`` (q_g row indices, by position), ``chunks [n, 4]`` (batch,
    position block, start in sorted_rows, count) grouped by batch, ``chunk_ptr [B + 1]`` and n.
    Built with tensor ops on the device; one host synchronisation (n sizes the grid). Every layer
    of a model gets the same ``target_pos`` tensor, so the result is kept for it until it changes.
    """
    global _chunk_cache
    ref, version, key, result = _chunk_cache
    if ref is not None and ref() is target_pos and version == target_pos._version and key == (Lq, BM, BQ):
        return result
    B, P = target_pos.shape
    dev = target_pos.device
    tp = target_pos.to(torch.int64)
    valid = ~_padding_rows(tp, Lq)
    order = torch.sort(torch.where(valid, tp, torch.iinfo(torch.int64).max), dim=1, stable=True).indices
    n_mb = triton.cdiv(Lq, BM)
    # rows per (batch, position block), then chunks of BQ rows per block, in (batch, block) order
    counts = torch.zeros(B, n_mb, dtype=torch.int64, device=dev)
    counts.scatter_add_(1, torch.where(valid, tp // BM, 0), valid.to(torch.int64))
    block_start = torch.cumsum(counts, 1) - counts  # first sorted row of each block
    n_chunks = (counts + BQ - 1) // BQ
    per_block = n_chunks.flatten()
    owner = torch.repeat_interleave(torch.arange(B * n_mb, device=dev), per_block)  # the one sync
    first_chunk = torch.cumsum(per_block, 0) - per_block
    k = torch.arange(owner.numel(), device=dev) - first_chunk[owner]
    b, m = owner // n_mb, owner % n_mb
    start = block_start.flatten()[owner] + k * BQ
    count = torch.minimum(counts.flatten()[owner] - k * BQ, torch.full_like(k, BQ))
    chunks = torch.stack([b, m, start, count], 1).to(torch.int32)
    chunk_ptr = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), torch.cumsum(n_chunks.sum(1), 0)])
    n = chunks.shape[0]
    if n == 0:
        chunks = torch.zeros(1, 4, dtype=torch.int32, device=dev)
    result = (order.to(torch.int32).contiguous(), chunks.contiguous(), chunk_ptr.to(torch.int32), n)
    _chunk_cache = (weakref.ref(target_pos), target_pos._version, (Lq, BM, BQ), result)
    return result


def _t5_table(t5_bias, cfg, Lq, Lk, device):
    """Per-distance T5 bias ``[H, Lq + Lk - 1]`` (index j - i + Lq - 1) and the bucket of each distance."""
    M = Lk - Lq
    rel = torch.arange(Lq + Lk - 1, device=device) - (M + Lq - 1)
    bucket = t5_relative_bucket(
        rel, bidirectional=cfg["t5_bidirectional"], num_buckets=cfg["t5_num_buckets"],
        max_distance=cfg["t5_max_distance"],
    )
    return t5_bias.float()[bucket].t().contiguous(), bucket


class _Launch:
    """Argument lists shared by the four kernels (order = COMMON / CONST blocks of the kernels)."""

    def __init__(self, q, k, v, r, r_w_bias, r_r_bias, r_s_bias, seg_embed, q_g, target_pos, aux, cfg, chunks=None):
        """``chunks``: the forward's ``(sorted_rows, chunks [n, 4], chunk_ptr)``, reused by the backward."""
        B, Lq, H, D = q.shape
        Lk = k.shape[1]
        P = q_g.shape[1] if q_g is not None else 0
        R = r.shape[-3] if r is not None else 0
        blk = _row_blocks()
        self.B, self.Lq, self.Lk, self.H, self.D, self.P = B, Lq, Lk, H, D, P
        self.BM, self.BQ = blk["BM"], blk["BQ"]
        self.BD = max(16, triton.next_power_of_2(D))
        self.n_mb = triton.cdiv(Lq, self.BM)
        dummy = q
        # r_w_bias . k_j and r_r_bias . r_t once per key / r row (fp32, O(B*H*L)): tiles then add a
        # vector instead of reducing a [keys, D] product each (register pressure on the GPU).
        # Missing biases are zeros (O(H*D)); without r the kernels never read r, r_r_bias or r_r.
        if r_w_bias is None:
            r_w_bias = torch.zeros(H, D, dtype=q.dtype, device=q.device)
            self.w_k = torch.zeros(B, H, Lk, dtype=torch.float32, device=q.device)
        else:
            self.w_k = torch.einsum("bjhd,hd->bhj", k.float(), r_w_bias.float()).contiguous()
        if r is not None:
            r4 = r if r.dim() == 4 else r.unsqueeze(0).expand(B, *r.shape)
            self.r_r = torch.einsum("bthd,hd->bht", r4.float(), r_r_bias.float()).contiguous()
        else:
            r4, r_r_bias, self.r_r = q, r_w_bias, self.w_k
        if q_g is not None and chunks is not None:
            self.sorted_rows, self.chunks, self.chunk_ptr = chunks
            self.n_chunks = self.chunks.shape[0]
            if self.n_chunks == 0:  # the kernels take a pointer even when no program reads it
                self.chunks = torch.zeros(1, 4, dtype=torch.int32, device=q.device)
        elif q_g is not None:
            self.sorted_rows, self.chunks, self.chunk_ptr, self.n_chunks = _query_chunks(
                target_pos, Lq, self.BM, self.BQ
            )
        else:
            self.sorted_rows = torch.zeros(B, 1, dtype=torch.int32, device=q.device)
            self.chunks = torch.zeros(1, 4, dtype=torch.int32, device=q.device)
            self.chunk_ptr = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
            self.n_chunks = 0
        t5 = aux["t5_table"]
        u8 = lambda t: None if t is None else t.view(torch.uint8)  # noqa: E731
        mask, kpm, segd = u8(aux["attn_mask"]), u8(aux["key_padding_mask"]), u8(aux["seg_diff"])
        or_dummy = lambda t: dummy if t is None else t  # noqa: E731
        has_seg = r_s_bias is not None
        self.common = (
            k, *k.stride(), v, *v.stride(), r4, *r4.stride(), r_w_bias, r_r_bias, or_dummy(r_s_bias),
            r_w_bias.stride(0), self.w_k, self.r_r, or_dummy(seg_embed),
            *(seg_embed.stride()[:2] if has_seg else (0, 0)),
            self.sorted_rows, self.sorted_rows.stride(0), or_dummy(target_pos),
            *(target_pos.stride() if target_pos is not None else (0, 0)), or_dummy(aux["q_rank"]),
            _strides(aux["q_rank"], 2)[0], or_dummy(aux["k_rank"]), _strides(aux["k_rank"], 2)[0], or_dummy(kpm),
            *_strides(kpm, 2), or_dummy(aux["seg_q"]), _strides(aux["seg_q"], 2)[0], or_dummy(aux["seg_k"]),
            _strides(aux["seg_k"], 2)[0], or_dummy(mask), *_strides(mask, 3), or_dummy(segd), *_strides(segd, 3),
            or_dummy(t5), *_strides(t5, 2), seed_value(cfg["seed"]) if cfg["dropout_p"] > 0 else 0, cfg["dropout_p"],
            cfg["scale"], B, H, Lq, Lk, Lk - Lq, R, P, D,
        )
        self.flags = dict(
            HAS_RANK=aux["q_rank"] is not None,
            HAS_DENSE=mask is not None,
            HAS_KPM=kpm is not None,
            CAUSAL=cfg["causal"],
            SEG_IDS=aux["seg_q"] is not None,
            SEG_DENSE=segd is not None,
            HAS_T5=t5 is not None,
            HAS_R=r is not None,
            SEES_SELF=cfg["content_sees_self"],
            HAS_DROPOUT=cfg["dropout_p"] > 0,
            EMPTY_UNIFORM=cfg["empty_rows"] == "uniform",
            DOT_PREC=_dot_precision(q.dtype),
        )

    def consts(self):
        """Compile-time switches for the autotuned kernels (they pick BN, num_warps, num_stages)."""
        return dict(self.flags, BM=self.BM, BD=self.BD, BAND=2 * self.BM, BQ=self.BQ)

    def consts_dr(self):
        """The dr kernel walks block diagonals, so its key tile equals the row block (BN = BM)."""
        return dict(self.consts(), BN=self.BM, num_warps=1 if _interpreting() else 8, num_stages=1)


def _row_stats(B, H, L, device):
    """Per-row softmax statistics ``[B, H, L, 2]``: the row max of the scores and ``log(sum exp(s - max))``
    (zeros for query-stream padding rows, which no program visits)."""
    return torch.zeros(B, H, max(L, 1), 2, dtype=torch.float32, device=device)


def _delta(do, out, stats, BD):
    """``rowsum(dO * O)`` laid out like the row statistics (slot 0), so both share the kernels' strides."""
    delta = torch.empty_like(stats)
    B, L, H, D = out.shape
    if B * L * H:
        rows = 16
        n_lb = triton.cdiv(L, rows)
        _delta_kernel[(B * n_lb, H)](do, *do.stride(), out, *out.stride(), delta, *delta.stride()[:2], L, D, n_lb,
                                     ROWS=rows, BD=BD, num_warps=4 if not _interpreting() else 1)
    return delta


#: The op's arguments, in schema order (the native backend's ``pyobjectives::two_stream_attention_fwd`` order).
_ARGS = ("q", "k", "v", "r", "r_w_bias", "r_r_bias", "q_g", "target_pos", "q_rank", "k_rank", "attn_mask",
         "key_padding_mask", "causal", "seg_q", "seg_k", "seg_diff", "r_s_bias", "seg_embed", "t5_bias",
         "t5_num_buckets", "t5_max_distance", "t5_bidirectional", "content_sees_self", "scale", "dropout_p", "seed",
         "empty_uniform")
_SCHEMA_ARGS = (
    "Tensor q, Tensor k, Tensor v, Tensor? r, Tensor? r_w_bias, Tensor? r_r_bias, Tensor? q_g, Tensor? target_pos, "
    "Tensor? q_rank, Tensor? k_rank, Tensor? attn_mask, Tensor? key_padding_mask, bool causal, Tensor? seg_q, "
    "Tensor? seg_k, Tensor? seg_diff, Tensor? r_s_bias, Tensor? seg_embed, Tensor? t5_bias, int t5_num_buckets, "
    "int t5_max_distance, bool t5_bidirectional, bool content_sees_self, float scale, float dropout_p, Tensor? seed, "
    "bool empty_uniform"
)
#: The differentiable inputs and their index in the backward op's result.
_GRAD_OF = {"q": 0, "k": 1, "v": 2, "r": 3, "r_w_bias": 4, "r_r_bias": 5, "q_g": 6, "r_s_bias": 7, "seg_embed": 8,
            "t5_bias": 9}
OP_FWD, OP_BWD = "pyobjectives_triton::two_stream_attention_fwd", "pyobjectives_triton::two_stream_attention_bwd"

# The Triton launches are opaque registered ops (fake kernels below, autograd formula registered), so
# torch.compile and torch.export see one op each and never run the launchers on fake tensors.
_lib = torch.library.Library("pyobjectives_triton", "FRAGMENT")
_lib.define(f"two_stream_attention_fwd({_SCHEMA_ARGS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_lib.define(f"two_stream_attention_bwd(Tensor do_h, Tensor do_g, Tensor out_h, Tensor out_g, Tensor lse_h, "
            f"Tensor lse_g, Tensor sorted_rows, Tensor chunks, Tensor chunk_ptr, {_SCHEMA_ARGS}) -> Tensor[]")


def _aux_cfg(a):
    """The kernels' auxiliary tensors and options from the op's named arguments."""
    aux = {name: a[name] for name in ("target_pos", "q_rank", "k_rank", "attn_mask", "key_padding_mask", "seg_q",
                                      "seg_k", "seg_diff")}
    cfg = {name: a[name] for name in ("causal", "t5_num_buckets", "t5_max_distance", "t5_bidirectional",
                                      "content_sees_self", "scale", "dropout_p", "seed")}
    cfg["empty_rows"] = "uniform" if a["empty_uniform"] else "zero"
    q, t5_bias = a["q"], a["t5_bias"]
    if t5_bias is not None:
        aux["t5_table"], aux["t5_bucket"] = _t5_table(t5_bias, cfg, q.shape[1], a["k"].shape[1], q.device)
    else:
        aux["t5_table"] = aux["t5_bucket"] = None
    return aux, cfg


def _launch(a, aux, cfg, chunks=None):
    return _Launch(a["q"], a["k"], a["v"], a["r"], a["r_w_bias"], a["r_r_bias"], a["r_s_bias"], a["seg_embed"],
                   a["q_g"], a["target_pos"], aux, cfg, chunks)


@torch.library.register_kernel(OP_FWD, ("cpu", "cuda"))
def _attention_fwd(*args):
    """``(out_h, out_g, stats_h, stats_g, sorted_rows, chunks, chunk_ptr, out32_h, out32_g)``.

    The query-chunk layout is returned so that the backward pass reuses it instead of sorting
    again (a second host sync). For half-precision inputs the kernel writes the output in
    float32 (``out32_*``, empty for float32 inputs) and the backward takes ``delta = rowsum(dO * O)``
    from it: from the rounded output, delta is off by up to an ulp of half precision, which turns
    into gradient noise where the exact answer is ~0 (rows with one visible key). The price is
    4 instead of 2 bytes per saved output element.
    """
    a = dict(zip(_ARGS, args))
    q, q_g, target_pos = a["q"], a["q_g"], a["target_pos"]
    aux, cfg = _aux_cfg(a)
    launch = _launch(a, aux, cfg)
    B, Lq, H, D = q.shape
    P = launch.P
    acc_dtype = torch.float32
    out_h = new_output(q.shape, acc_dtype, q.device)
    lse_h = _row_stats(B, H, Lq, q.device)
    if q_g is not None:
        out_g = new_output(q_g.shape, acc_dtype, q.device)
        lse_g = _row_stats(B, H, P, q.device)
        qg_args = (q_g, *q_g.stride())
        og_args = (out_g, *out_g.stride())
    else:
        out_g, lse_g = q.new_empty(B, 0, H, D, dtype=acc_dtype), lse_h.new_empty(B, H, 0, 2)
        qg_args, og_args = (q, *q.stride()), (out_h, *out_h.stride())
    n_content = B * launch.n_mb
    _fwd_kernel[(n_content + launch.n_chunks, H)](
        launch.chunks, n_content, launch.n_mb, q, *q.stride(), *qg_args, out_h, *out_h.stride(), *og_args, lse_h,
        *lse_h.stride()[:2], lse_g if q_g is not None else lse_h, *(lse_g if q_g is not None else lse_h).stride()[:2],
        *launch.common, **launch.consts(),
    )
    if q_g is not None:
        # padding rows belong to no chunk
        out_g.masked_fill_(_padding_rows(target_pos, Lq)[:, :, None, None], 0.0)
    layout = (lse_h, lse_g, launch.sorted_rows, launch.chunks[: launch.n_chunks], launch.chunk_ptr)
    if q.dtype == acc_dtype:
        return (out_h, out_g, *layout, q.new_empty(0), q.new_empty(0))
    return (out_h.to(q.dtype), out_g.to(q.dtype), *layout, out_h, out_g)


@torch.library.register_fake(OP_FWD)
def _attention_fwd_fake(*args):
    a = dict(zip(_ARGS, args))
    q, q_g = a["q"], a["q_g"]
    B, Lq, H, D = q.shape
    i32, f32 = dict(dtype=torch.int32), dict(dtype=torch.float32)
    half = q.dtype != torch.float32
    out32 = lambda shape: q.new_empty(shape if half else (0,), **f32)  # noqa: E731
    if q_g is None:
        return (q.new_empty(q.shape), q.new_empty(B, 0, H, D), q.new_empty(B, H, max(Lq, 1), 2, **f32),
                q.new_empty(B, H, 0, 2, **f32), q.new_empty(B, 1, **i32), q.new_empty(0, 4, **i32),
                q.new_empty(B + 1, **i32), out32(q.shape), out32((B, 0, H, D)))
    P = q_g.shape[1]
    n_chunks = torch.library.get_ctx().new_dynamic_size()  # data-dependent: how target_pos falls into blocks
    return (q.new_empty(q.shape), q.new_empty(q_g.shape), q.new_empty(B, H, max(Lq, 1), 2, **f32),
            q.new_empty(B, H, max(P, 1), 2, **f32), q.new_empty(B, P, **i32), q.new_empty(n_chunks, 4, **i32),
            q.new_empty(B + 1, **i32), out32(q.shape), out32(q_g.shape))


def _attention_setup(ctx, inputs, output):
    is_tensor = [isinstance(x, torch.Tensor) for x in inputs]
    ctx.is_tensor = is_tensor
    ctx.scalars = [None if t else x for t, x in zip(is_tensor, inputs)]
    out_h, out_g, *layout, out32_h, out32_g = output
    # the backward needs the output only for delta, from the float32 copy where there is one
    if out_h.dtype != torch.float32:
        out_h, out_g = out32_h, out32_g
    ctx.save_for_backward(*[x for x, t in zip(inputs, is_tensor) if t], out_h, out_g, *layout)


def _attention_backward(ctx, do_h, do_g, *_):
    saved = list(ctx.saved_tensors)
    out = saved[-7:]
    tensors = iter(saved[:-7])
    args = [next(tensors) if t else s for t, s in zip(ctx.is_tensor, ctx.scalars)]
    out_h, out_g = out[0], out[1]
    dtype = args[0].dtype
    do_h = out_h.new_zeros(out_h.shape, dtype=dtype) if do_h is None else do_h
    do_g = out_g.new_zeros(out_g.shape, dtype=dtype) if do_g is None else do_g
    grads = torch.ops.pyobjectives_triton.two_stream_attention_bwd(do_h, do_g, *out, *args)
    named = dict(zip(_ARGS, args))
    return tuple(grads[_GRAD_OF[name]] if name in _GRAD_OF and named[name] is not None else None for name in _ARGS)


torch.library.register_autograd(OP_FWD, _attention_backward, setup_context=_attention_setup)


@torch.library.register_fake(OP_BWD)
def _attention_bwd_fake(do_h, do_g, out_h, out_g, lse_h, lse_g, sorted_rows, chunks, chunk_ptr, *args):
    a = dict(zip(_ARGS, args))
    q = a["q"]
    like = lambda t: q.new_empty(0) if t is None else t.new_empty(t.shape)  # noqa: E731
    segments = a["r_s_bias"] is not None
    return [like(q), like(a["k"]), like(a["v"]), like(a["r"]), like(a["r_w_bias"]), like(a["r_r_bias"]),
            like(a["q_g"]), like(a["r_s_bias"]) if segments else like(None),
            like(a["seg_embed"]) if segments else like(None), like(a["t5_bias"])]


@torch.library.register_kernel(OP_BWD, ("cpu", "cuda"))
def _attention_bwd(do_h, do_g, out_h, out_g, lse_h, lse_g, sorted_rows, chunks, chunk_ptr, *args):
    """Gradients of every differentiable input, in ``_GRAD_OF`` order (empty tensors for absent inputs)."""
    a = dict(zip(_ARGS, args))
    aux, cfg = _aux_cfg(a)
    launch = _launch(a, aux, cfg, chunks=(sorted_rows, chunks, chunk_ptr))
    q, k, v, r, r_w_bias, r_r_bias, q_g, r_s_bias, seg_embed, t5_bias = (
        a[name] for name in ("q", "k", "v", "r", "r_w_bias", "r_r_bias", "q_g", "r_s_bias", "seg_embed", "t5_bias"))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    dev = q.device
    delta_h = _delta(do_h, out_h, lse_h, launch.BD)
    if q_g is not None:
        delta_g = _delta(do_g, out_g, lse_g, launch.BD)
        g_rows = (q_g, *q_g.stride(), do_g, *do_g.stride(), lse_g, delta_g, *lse_g.stride()[:2])
    else:
        delta_g = delta_h
    h_rows = (q, *q.stride(), do_h, *do_h.stride(), lse_h, delta_h, *lse_h.stride()[:2])
    if q_g is None:
        g_rows = h_rows
    consts = launch.consts()
    n_content = B * launch.n_mb
    n_prog = n_content + launch.n_chunks

    dq = new_output(q.shape, q.dtype, dev)
    dq_g = new_output(q_g.shape, q.dtype, dev) if q_g is not None else dq
    has_seg = r_s_bias is not None
    de_h = torch.zeros(B, H, Lq, 2, dtype=torch.float32, device=dev)
    de_g = torch.zeros(B, H, max(launch.P, 1), 2, dtype=torch.float32, device=dev)
    bias_part = torch.empty(n_prog, H, 2, launch.BD, dtype=torch.float32, device=dev)
    _dq_kernel[(n_prog, H)](
        launch.chunks, n_content, launch.n_mb, *h_rows, *g_rows, dq, *dq.stride(), dq_g, *dq_g.stride(), de_h,
        *de_h.stride()[:2], de_g, *de_g.stride()[:2], bias_part, *launch.common, **consts,
    )

    dk = new_output(k.shape, k.dtype, dev)
    dv = new_output(v.shape, v.dtype, dev)
    _dkdv_kernel[lambda meta: (triton.cdiv(Lk, meta["BN"]), B * H)](
        launch.chunks, launch.chunk_ptr, launch.n_mb, *h_rows, *g_rows, dk, *dk.stride(), dv, *dv.stride(),
        *launch.common, **consts,
    )

    # dr (and the per-distance T5 gradient): one program per block diagonal, BN = BM
    dr = dt_part = None
    if r is not None or t5_bias is not None:
        n_nb = triton.cdiv(Lk, launch.BM)
        n_diag = launch.n_mb + n_nb - 1
        consts_r = launch.consts_dr()
        band = consts_r["BAND"]
        dr_part = torch.empty(B, H, n_diag, band, launch.BD, dtype=torch.float32, device=dev)
        dt_part = torch.empty(B, H, n_diag, band, dtype=torch.float32, device=dev)
        _dr_kernel[(n_diag, B * H)](
            launch.chunks, launch.chunk_ptr, launch.n_mb, n_nb, *h_rows, *g_rows, dr_part, dt_part,
            *launch.common, **consts_r,
        )
    if r is not None:
        dr_rows, first_row = _combine_bands(dr_part, launch.BM, launch.n_mb, Lq)
        dr_full = _rows_window(dr_rows, first_row, 0, r.shape[-3])[..., :D]  # [B, H, R, D]
        dr = dr_full.permute(0, 2, 1, 3)
        dr = (dr.sum(0) if r.dim() == 3 else dr).to(r.dtype)

    if q_g is not None:
        dq_g.masked_fill_(_padding_rows(aux["target_pos"], Lq)[:, :, None, None], 0.0)
    sums = bias_part.sum(0)[..., :D]  # [H, 2, D]
    d_rw = sums[:, 0].to(r_w_bias.dtype) if r_w_bias is not None else None
    d_rr = sums[:, 1].to(r_r_bias.dtype) if r_r_bias is not None else None
    d_rs = d_se = None
    if has_seg:
        # ef = (q + r_s_bias) . seg_embed[s]: per-row dE_s gives both gradients
        se = seg_embed.float()
        qs_h = q.float() + r_s_bias.float()
        d_se = torch.einsum("bhis,bihd->shd", de_h, qs_h)
        tot = de_h.sum((0, 2))
        if q_g is not None:
            valid = (~_padding_rows(aux["target_pos"], Lq))[:, None, :, None]
            de_g_valid = de_g[:, :, : launch.P] * valid
            d_se = d_se + torch.einsum("bhis,bihd->shd", de_g_valid, q_g.float() + r_s_bias.float())
            tot = tot + de_g_valid.sum((0, 2))
        d_rs = (tot[:, 0, None] * se[0] + tot[:, 1, None] * se[1]).to(r_s_bias.dtype)
        d_se = d_se.to(seg_embed.dtype)
    d_t5 = None
    if t5_bias is not None:
        dt_rows, first_t = _combine_bands(dt_part[..., None], launch.BM, launch.n_mb, Lq)
        d_rel = _rows_window(dt_rows, first_t, 1, Lq + Lk)[..., 0].sum(0)  # [H, Lq + Lk - 1], index t - 1
        # by comparison: F.one_hot checks its values on the host (a sync on CUDA)
        buckets = torch.arange(cfg["t5_num_buckets"], device=dev)
        one_hot = (aux["t5_bucket"][:, None] == buckets).float()
        d_t5 = (one_hot.t() @ d_rel.t()).to(t5_bias.dtype)
    empty = q.new_empty(0)
    return [empty if g is None else g for g in (dq, dk, dv, dr, d_rw, d_rr, dq_g if q_g is not None else None,
                                                 d_rs, d_se, d_t5)]


def _combine_bands(part, BM, n_mb, Lq):
    """Sum per-diagonal bands ``[B, H, n_diag, BAND, X]`` into r rows, in a fixed order (no atomics).

    Band i covers r rows from ``Lq - BM + 1 + (i - n_mb + 1) * BM`` on; consecutive
    bands overlap by ``BM - 1`` rows, so each band's lower half and the previous
    band's upper half land on the same BM rows. Returns ``(rows, first)``:
    ``rows [B, H, (n_diag + 1) * BM, X]`` starting at r row ``first``.
    """
    B, H, n_diag, _, X = part.shape
    halves = torch.zeros(B, H, n_diag + 1, BM, X, dtype=part.dtype, device=part.device)
    halves[:, :, :n_diag] += part[:, :, :, :BM]
    halves[:, :, 1:] += part[:, :, :, BM : 2 * BM]
    return halves.reshape(B, H, (n_diag + 1) * BM, X), Lq - BM + 1 - (n_mb - 1) * BM


def _rows_window(rows, first, lo, hi):
    """Rows for r indices ``[lo, hi)`` out of ``rows`` (which start at r index ``first``); zeros outside."""
    n = rows.shape[2]
    pad_lo = max(0, first - lo)
    pad_hi = max(0, hi - (first + n))
    padded = torch.nn.functional.pad(rows, (0, 0, pad_lo, pad_hi))
    start = lo - first + pad_lo
    return padded[:, :, start : start + hi - lo]


def two_stream_attention(
    q, k, v, r=None, r_w_bias=None, r_r_bias=None, *, q_g=None, target_pos=None, q_rank=None, k_rank=None,
    attn_mask=None, key_padding_mask=None, causal=False, seg_q=None, seg_k=None, seg_diff=None, r_s_bias=None,
    seg_embed=None, t5_bias=None, t5_num_buckets=32, t5_max_distance=128, t5_bidirectional=True,
    content_sees_self=True, scale=None, dropout_p=0.0, seed=None, empty_rows="zero",
):
    """Triton backend of :func:`pyobjectives.two_stream_attention` (arguments validated there)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out_h, out_g, *_ = torch.ops.pyobjectives_triton.two_stream_attention_fwd(
        q, k, v, r, r_w_bias, r_r_bias, q_g, target_pos, q_rank, k_rank, attn_mask, key_padding_mask, bool(causal),
        seg_q, seg_k, seg_diff, r_s_bias, seg_embed, t5_bias, int(t5_num_buckets), int(t5_max_distance),
        bool(t5_bidirectional), bool(content_sees_self), scale, float(dropout_p), seed_tensor(seed) if dropout_p > 0 else None,
        empty_rows == "uniform")
    return out_h, (out_g if q_g is not None else None)
