"""Random inputs for two_stream_attention tests, with optional features switched on."""

import torch

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def make_inputs(B=2, Lq=7, M=0, H=2, D=8, P=3, R=None, per_batch_r=False, dtype=torch.float64, features=()):
    """Fresh random inputs (never zeros) with the given optional features switched on."""
    Lk = M + Lq
    R = Lk + Lq if R is None else R
    rnd = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    x = dict(q=rnd(B, Lq, H, D), k=rnd(B, Lk, H, D), v=rnd(B, Lk, H, D),
             r=rnd(B, R, H, D) if per_batch_r else rnd(R, H, D), r_w_bias=rnd(H, D), r_r_bias=rnd(H, D))
    kw = {}
    if "query" in features:
        kw["q_g"] = rnd(B, P, H, D)
        tp = torch.stack([torch.randperm(Lq)[:P] if P <= Lq else torch.randint(0, Lq, (P,)) for _ in range(B)])
        tp[0, -1] = -1  # one padding row
        kw["target_pos"] = tp
    if "rank" in features:
        perm = torch.stack([torch.randperm(Lq) for _ in range(B)]).int()
        is_target = torch.rand(B, Lq) < 0.5
        kw["q_rank"] = torch.where(is_target, perm, torch.zeros_like(perm))
        k_cur = torch.where(is_target, perm, torch.full_like(perm, -1))
        kw["k_rank"] = torch.cat([torch.full((B, M), INT32_MIN, dtype=torch.int32), k_cur], 1)
    if "dense" in features:
        kw["attn_mask"] = torch.rand(B, Lq, Lk) < 0.3
    if "padding" in features:
        kpm = torch.rand(B, Lk) < 0.25
        kw["key_padding_mask"] = kpm
    if "causal" in features:
        kw["causal"] = True
    if "seg_ids" in features:
        seg = torch.randint(0, 3, (B, Lk))
        seg[:, :M] = 0
        kw.update(seg_q=seg[:, M:], seg_k=seg)
    if "seg_dense" in features:
        kw["seg_diff"] = torch.rand(B, Lq, Lk) < 0.5
    if "seg_ids" in features or "seg_dense" in features:
        kw.update(r_s_bias=rnd(H, D), seg_embed=rnd(2, H, D))
    if "t5" in features or "t5_uni" in features:
        kw.update(t5_bias=rnd(16, H), t5_num_buckets=16, t5_max_distance=20, t5_bidirectional="t5" in features)
    return x, kw
