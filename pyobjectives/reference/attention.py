"""Pure-PyTorch two-stream relative attention: the exact function of the spec.

Readable and exact rather than fast: it materializes ``[B, H, rows, Lk]`` scores
(the reference is allowed to; fused backends are not). The position term is
``(q + r_r_bias) . r`` for all ``R`` rows of ``r`` (``[B, H, rows, R]``, the same
cost as HF's ``rel_shift``) followed by one gather along the diagonals, instead
of gathering ``r`` per (i, j) pair, which would cost ``O(B*Lq*Lk*H*D)``.

Arguments are validated by :func:`pyobjectives.two_stream_attention`; call that
unless you know the inputs are well formed.
"""

from __future__ import annotations

import math

import torch

from .philox import philox_uniform


def t5_relative_bucket(relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                       max_distance: int) -> torch.Tensor:
    """T5's log-bucketing of ``relative_position = key_pos - query_pos`` into ``[0, num_buckets)``.

    Half the buckets (per direction when bidirectional) hold exact small distances,
    the rest grow logarithmically up to ``max_distance``; the log is taken in float32
    as T5 does, so fused kernels must match it there. Needs ``num_buckets >= 4``
    (bidirectional) or ``>= 2`` and ``max_distance > num_buckets // 4`` (resp. ``// 2``),
    which :func:`pyobjectives.two_stream_attention` checks.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).to(bucket.dtype) * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # Clamping keeps log() finite where the exact branch is taken anyway.
    log_ratio = torch.log(distance.clamp(min=max_exact).to(torch.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)).to(bucket.dtype)
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


def _dropout_offsets(B: int, H: int, rows: int, Lk: int, base: int, device) -> torch.Tensor:
    """Philox offsets ``base + ((b*H + h)*rows + i)*Lk + j`` as ``[B, H, rows, Lk]`` (see philox.py)."""
    idx = torch.arange(B * H * rows * Lk, dtype=torch.int64, device=device)
    return (idx + base).view(B, H, rows, Lk)


def _stream(qx, pos, row_valid, is_content, *, k, v, r, r_w_bias, r_r_bias, Lq, M, q_rank, k_rank, attn_mask,
            key_padding_mask, causal, seg_q, seg_k, seg_diff, r_s_bias, seg_embed, t5_bias, t5_num_buckets,
            t5_max_distance, t5_bidirectional, content_sees_self, scale, dropout_p, seed, dropout_base, empty_rows,
            return_probs):
    """Attention for one stream: rows ``qx [B, rows, H, D]`` at query positions ``pos [B, rows]``."""
    B, rows, H, _ = qx.shape
    Lk = k.shape[1]
    dev = qx.device
    j = torch.arange(Lk, device=dev)

    score = torch.einsum("bihd,bjhd->bhij", qx if r_w_bias is None else qx + r_w_bias, k)
    if r is not None:
        R = r.shape[-3]
        r_eq = "brhd" if r.dim() == 4 else "rhd"
        bd_all = torch.einsum(f"bihd,{r_eq}->bhir", qx + r_r_bias, r)
        # r row Lq - i + j holds distance (M + i) - j; rows outside [0, R) contribute 0 (spec),
        # so they read an appended zero column.
        r_row = Lq - pos[:, :, None] + j
        r_row = torch.where((r_row >= 0) & (r_row < R), r_row, R)
        bd_all = torch.nn.functional.pad(bd_all, (0, 1))
        score = score + torch.gather(bd_all, 3, r_row[:, None].expand(B, H, rows, Lk))

    differ = None
    if seg_q is not None:
        differ = torch.gather(seg_q, 1, pos)[:, :, None] != seg_k[:, None, :]
    elif seg_diff is not None:
        differ = torch.gather(seg_diff, 1, pos[:, :, None].expand(B, rows, Lk))
    if differ is not None:
        ef = torch.einsum("bihd,shd->bhis", qx + r_s_bias, seg_embed)
        score = score + torch.where(differ[:, None], ef[..., 1:2], ef[..., 0:1])
    score = score * scale

    if t5_bias is not None:
        bucket = t5_relative_bucket(j[None, None, :] - (M + pos[:, :, None]), bidirectional=t5_bidirectional,
                                    num_buckets=t5_num_buckets, max_distance=t5_max_distance)
        score = score + t5_bias.t()[:, bucket].permute(1, 0, 2, 3).to(score.dtype)

    visible = torch.ones(B, rows, Lk, dtype=torch.bool, device=dev)
    if q_rank is not None:
        visible &= k_rank[:, None, :] < torch.gather(q_rank, 1, pos)[:, :, None]
    if attn_mask is not None:
        visible &= ~torch.gather(attn_mask, 1, pos[:, :, None].expand(B, rows, Lk))
    if key_padding_mask is not None:
        visible &= ~key_padding_mask[:, None, :]
    if causal:
        visible &= j[None, None, :] <= M + pos[:, :, None]
    if is_content and content_sees_self:
        # XLNet: a token's content always sees itself, whatever the masks say (HF's non_tgt_mask).
        visible |= j[None, None, :] == M + pos[:, :, None]
    visible = visible[:, None]

    row_max = score.masked_fill(~visible, float("-inf")).amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    # exp(-inf) = 0 keeps masked entries out of both the sum and the gradient (no 0 * inf).
    expd = torch.exp(torch.where(visible, score - row_max, torch.full_like(score, float("-inf"))))
    denom = expd.sum(dim=-1, keepdim=True)
    has_visible = visible.any(dim=-1, keepdim=True)
    probs = expd / torch.where(has_visible, denom, torch.ones_like(denom))
    if empty_rows == "uniform":
        # HF subtracts 1e30 from masked scores: the value becomes uniform, but autograd still
        # differentiates the softmax (at the uniform point). softmax(s - s.detach()) is exactly that;
        # nan_to_num keeps a NaN in a masked score out of the value, as for rows with visible keys.
        probs = torch.where(has_visible, probs, torch.softmax(torch.nan_to_num(score - score.detach()), dim=-1))

    if dropout_p > 0.0:
        keep = philox_uniform(seed, _dropout_offsets(B, H, rows, Lk, dropout_base, dev)) >= dropout_p
        # Dropped entries are probs * 0 (not 0): a NaN row stays NaN even when dropout drops all of
        # it, as with torch.nn.functional.dropout.
        probs_used = torch.where(keep, probs / (1.0 - dropout_p), probs * 0.0)
    else:
        probs_used = probs

    out = torch.einsum("bhij,bjhd->bihd", probs_used, v)
    if row_valid is not None:
        # A padding row (target_pos = -1) is exactly 0, even where NaN inputs make its attention NaN.
        out = torch.where(row_valid[:, :, None, None], out, torch.zeros_like(out))
    return out, (probs if return_probs else None)


def two_stream_attention(q, k, v, r=None, r_w_bias=None, r_r_bias=None, *, q_g=None, target_pos=None, q_rank=None,
                         k_rank=None, attn_mask=None, key_padding_mask=None, causal=False, seg_q=None, seg_k=None,
                         seg_diff=None, r_s_bias=None, seg_embed=None, t5_bias=None, t5_num_buckets=32,
                         t5_max_distance=128, t5_bidirectional=True, content_sees_self=True, scale=None,
                         dropout_p=0.0, seed=None, empty_rows="zero", upcast=False, return_probs=False):
    """Reference two-stream relative attention; arguments as :func:`pyobjectives.two_stream_attention`.

    ``upcast=True`` computes in float32 for half / bfloat16 inputs (outputs are
    cast back); by default the arithmetic runs in the input dtype, as eager HF does.
    ``return_probs=True`` also returns the (pre-dropout) probabilities
    ``[B, H, Lq, Lk]`` and ``[B, H, P, Lk]``, for ``output_attentions``.

    Returns ``(out_h, out_g)``, or ``(out_h, out_g, probs_h, probs_g)``.
    """
    out_dtype = q.dtype
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        cast = lambda t: None if t is None else t.float()  # noqa: E731
        q, k, v, r, r_w_bias, r_r_bias, q_g, r_s_bias, seg_embed, t5_bias = map(
            cast, (q, k, v, r, r_w_bias, r_r_bias, q_g, r_s_bias, seg_embed, t5_bias))
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    shared = dict(k=k, v=v, r=r, r_w_bias=r_w_bias, r_r_bias=r_r_bias, Lq=Lq, M=Lk - Lq, q_rank=q_rank,
                  k_rank=k_rank, attn_mask=attn_mask, key_padding_mask=key_padding_mask, causal=causal, seg_q=seg_q,
                  seg_k=seg_k, seg_diff=seg_diff, r_s_bias=r_s_bias, seg_embed=seg_embed, t5_bias=t5_bias,
                  t5_num_buckets=t5_num_buckets, t5_max_distance=t5_max_distance, t5_bidirectional=t5_bidirectional,
                  content_sees_self=content_sees_self, scale=scale, dropout_p=dropout_p, seed=seed,
                  empty_rows=empty_rows, return_probs=return_probs)
    content_pos = torch.arange(Lq, device=q.device).expand(B, Lq)
    out_h, probs_h = _stream(q, content_pos, None, True, dropout_base=0, **shared)
    out_g = probs_g = None
    if q_g is not None:
        # -1 marks padding; an unchecked position outside [0, Lq) is padding too (never an index)
        row_valid = (target_pos >= 0) & (target_pos < Lq)
        out_g, probs_g = _stream(q_g, torch.where(row_valid, target_pos, 0).long(), row_valid, False,
                                 dropout_base=B * H * Lq * Lk, **shared)
        out_g = out_g.to(out_dtype)
    out_h = out_h.to(out_dtype)
    if return_probs:
        return out_h, out_g, probs_h, probs_g
    return out_h, out_g
