"""The attention reference against HF's rel_attn_core, an independent brute-force oracle,
float64, gradcheck, and the spec's mask / dropout / empty-row semantics."""

import math

import pytest
import torch

from pyobjectives import reference, two_stream_attention
from pyobjectives.reference.philox import philox_uniform

from attention_inputs import make_inputs

transformers = pytest.importorskip("transformers")
from transformers import XLNetConfig  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402
from transformers.models.xlnet.modeling_xlnet import XLNetRelativeAttention  # noqa: E402

def naive(q, k, v, r, r_w_bias, r_r_bias, *, q_g=None, target_pos=None, q_rank=None, k_rank=None, attn_mask=None,
          key_padding_mask=None, causal=False, seg_q=None, seg_k=None, seg_diff=None, r_s_bias=None, seg_embed=None,
          t5_bias=None, t5_num_buckets=32, t5_max_distance=128, t5_bidirectional=True, empty_rows="zero"):
    """Brute force from the spec's formulas: gathers r per (i, j) pair, one batch at a time (test-only)."""
    B, Lq, H, D = q.shape
    Lk, R, M = k.shape[1], r.shape[-3], k.shape[1] - q.shape[1]
    scale = 1 / math.sqrt(D)

    def stream(b, qx, pos, content):
        rows = len(pos)
        i = pos[:, None]
        j = torch.arange(Lk)[None, :]
        rb = r[b] if r.dim() == 4 else r
        t = Lq - i + j
        ok = (t >= 0) & (t < R)
        r_pair = rb[t.clamp(0, R - 1)] * ok[..., None, None]
        s = torch.einsum("ihd,jhd->hij", qx + r_w_bias, k[b]) + torch.einsum("ihd,ijhd->hij", qx + r_r_bias, r_pair)
        differ = None
        if seg_q is not None:
            differ = seg_q[b][pos][:, None] != seg_k[b][None, :]
        if seg_diff is not None:
            differ = seg_diff[b][pos]
        if differ is not None:
            s = s + torch.einsum("ihd,ijhd->hij", qx + r_s_bias, seg_embed[differ.long()])
        s = s * scale
        if t5_bias is not None:
            bucket = T5Attention._relative_position_bucket(j - (M + i), bidirectional=t5_bidirectional,
                                                           num_buckets=t5_num_buckets, max_distance=t5_max_distance)
            s = s + t5_bias[bucket].permute(2, 0, 1)
        vis = torch.ones(rows, Lk, dtype=torch.bool)
        if q_rank is not None:
            vis &= k_rank[b][None, :] < q_rank[b][pos][:, None]
        if attn_mask is not None:
            vis &= ~attn_mask[b][pos]
        if key_padding_mask is not None:
            vis &= ~key_padding_mask[b][None, :]
        if causal:
            vis &= j <= M + i
        if content:
            vis |= j == M + i
        p = torch.softmax(s.masked_fill(~vis, float("-inf")), -1)
        empty = ~vis.any(-1)
        p = torch.where(empty[None, :, None], torch.full_like(p, 1 / Lk if empty_rows == "uniform" else 0.0), p)
        return torch.einsum("hij,jhd->ihd", p, v[b])

    out_h = torch.stack([stream(b, q[b], torch.arange(Lq), True) for b in range(B)])
    out_g = None
    if q_g is not None:
        out_g = torch.stack([stream(b, q_g[b], target_pos[b].clamp(min=0), False) for b in range(B)])
        out_g = out_g * (target_pos >= 0)[..., None, None]
    return out_h, out_g


FEATURES = {
    "plain": (), "query": ("query",), "rank": ("query", "rank"), "dense": ("query", "dense"),
    "padding": ("query", "padding"), "causal": ("query", "causal"), "seg_ids": ("query", "seg_ids"),
    "seg_dense": ("seg_dense",), "t5_bi": ("query", "t5"), "t5_uni": ("t5_uni", "causal"),
    "all": ("query", "rank", "dense", "padding", "seg_ids", "t5"),
}


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("B,Lq,M,H,D,per_batch_r", [
    pytest.param(2, 7, 0, 2, 8, False, id="B2-L7-H2-D8"),
    pytest.param(1, 1, 0, 1, 4, False, id="B1-L1-H1-D4"),
    pytest.param(2, 5, 3, 3, 5, True, id="B2-L5-M3-H3-D5-rB"),
    pytest.param(1, 97, 4, 2, 16, False, id="B1-L97-M4-H2-D16"),
])
@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_reference_matches_brute_force(features, B, Lq, M, H, D, per_batch_r, empty_rows):
    x, kw = make_inputs(B=B, Lq=Lq, M=M, H=H, D=D, P=min(3, Lq + 1), per_batch_r=per_batch_r, features=features)
    got = reference.two_stream_attention(**x, **kw, empty_rows=empty_rows)
    want = naive(**x, **kw, empty_rows=empty_rows)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    if want[1] is not None:
        torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("attn_type", ["bi", "uni"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_reference_matches_hf_rel_attn_core(attn_type, dtype):
    """HF's einsum + rel_shift_bnij + -1e30 masking, time-major, with mems, segments and a fully masked row."""
    B, Lq, M, H, D = 2, 6, 3, 4, 8
    Lk = M + Lq
    R = Lk + 1 if attn_type == "uni" else Lk + Lq
    hf = XLNetRelativeAttention(XLNetConfig(d_model=H * D, n_head=H, d_inner=8, n_layer=1)).to(dtype).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p)
    rnd = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    q, k, v, r = (rnd(Lq, B, H, D).requires_grad_(), rnd(Lk, B, H, D).requires_grad_(),
                  rnd(Lk, B, H, D).requires_grad_(), rnd(R, B, H, D).requires_grad_())
    seg = torch.randint(0, 2, (B, Lk))
    seg[:, :M] = 0
    differ = seg[:, M:, None] != seg[:, None, :]
    mask = torch.rand(B, Lq, Lk) < 0.4
    if attn_type == "uni":
        mask |= torch.arange(Lk)[None, None, :] > (M + torch.arange(Lq))[None, :, None]
    if attn_type == "bi":
        # A fully masked row. With "uni" HF's rel_shift (R = Lk + 1) reads a neighbouring row's
        # bd for masked pairs, which its gradient then sees through the uniform softmax; the
        # spec (and the patch's docstring) use 0 for those r rows instead.
        mask[0, 1, :] = True
    seg_mat = torch.nn.functional.one_hot(differ.long(), 2).permute(1, 2, 0, 3).to(dtype)
    hf_mask = mask.permute(1, 2, 0)[..., None].to(dtype)
    want_g = hf.rel_attn_core(q, k, v, r, seg_mat=seg_mat, attn_mask=hf_mask)
    non_tgt = (mask & ~(torch.arange(Lk)[None, None, :] == (M + torch.arange(Lq))[None, :, None]))
    want_h = hf.rel_attn_core(q, k, v, r, seg_mat=seg_mat, attn_mask=non_tgt.permute(1, 2, 0)[..., None].to(dtype))
    leaves = [q, k, v, r, hf.r_w_bias, hf.r_r_bias, hf.r_s_bias, hf.seg_embed]
    weights = torch.randn(2, Lq, B, H, D, dtype=dtype)
    want_grads = torch.autograd.grad((want_h * weights[0]).sum() + (want_g * weights[1]).sum(), leaves)
    out_h, out_g = reference.two_stream_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), r.transpose(0, 1), hf.r_w_bias, hf.r_r_bias,
        q_g=q.transpose(0, 1), target_pos=torch.arange(Lq).expand(B, Lq), attn_mask=mask, seg_diff=differ,
        r_s_bias=hf.r_s_bias, seg_embed=hf.seg_embed, empty_rows="uniform")
    out_h, out_g = out_h.transpose(0, 1), out_g.transpose(0, 1)
    grads = torch.autograd.grad((out_h * weights[0]).sum() + (out_g * weights[1]).sum(), leaves)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out_h, want_h, rtol=tol, atol=tol)
    torch.testing.assert_close(out_g, want_g, rtol=tol, atol=tol)
    # including the fully masked row, whose gradient HF takes through the softmax at uniform
    for name, got, want in zip(["q", "k", "v", "r", "r_w_bias", "r_r_bias", "r_s_bias", "seg_embed"], grads, want_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 10, msg=lambda m: f"grad {name}: {m}")


def test_t5_buckets_match_hf_t5():
    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (16, 20), (8, 1000), (4, 3)):
            ours = reference.t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
            theirs = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb,
                                                           max_distance=md)
            assert torch.equal(ours, theirs), (bidirectional, nb, md)


GRAD_NAMES = ["q", "k", "v", "r", "r_w_bias", "r_r_bias", "q_g", "r_s_bias", "seg_embed", "t5_bias"]


@pytest.mark.parametrize("features", [("query", "rank", "seg_ids", "t5"), ("query", "dense", "padding", "seg_dense"),
                                      ("query", "causal", "t5_uni")], ids=["rank-seg-t5", "dense-pad-segdense",
                                                                          "causal-t5uni"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
def test_gradcheck_every_input(features, dropout_p):
    x, kw = make_inputs(B=1, Lq=4, M=2, H=2, D=3, P=2, features=features)
    tensors = {**x, **{n: kw[n] for n in GRAD_NAMES if n in kw}}
    names = list(tensors)
    rest = {n: val for n, val in kw.items() if n not in tensors}

    def fn(*args):
        out_h, out_g = reference.two_stream_attention(**dict(zip(names, args)), **rest, dropout_p=dropout_p, seed=7)
        return out_h, out_g

    torch.autograd.gradcheck(fn, [tensors[n].requires_grad_() for n in names])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_low_precision_reference_close_to_float64(dtype):
    x, kw = make_inputs(B=2, Lq=33, M=5, H=2, D=16, features=("query", "rank", "seg_ids", "t5"))
    want = reference.two_stream_attention(**x, **kw)
    cast = {n: t.to(dtype) for n, t in x.items()}
    kw_cast = {n: (t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in kw.items()}
    plain = reference.two_stream_attention(**cast, **kw_cast)
    upcast = reference.two_stream_attention(**cast, **kw_cast, upcast=True)
    bound = {torch.float32: 1e-4, torch.bfloat16: 0.5, torch.float16: 0.1}[dtype]
    for got, up, ref in zip(plain, upcast, want):
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert (got.double() - ref).abs().max() < bound
        # upcasting removes the low-precision arithmetic: only input rounding is left
        assert (up.double() - ref).abs().max() <= (got.double() - ref).abs().max() + 1e-6


def test_dropout_mask_follows_documented_offsets():
    """With v = identity, out_h = dropped probabilities: check them against Philox at the documented offsets."""
    B, Lq, H = 2, 5, 2
    D = Lk = Lq
    x, kw = make_inputs(B=B, Lq=Lq, H=H, D=D, features=("query",))
    x["v"] = torch.eye(Lk, dtype=torch.float64)[None, :, None, :].expand(B, Lk, H, D)
    p_drop, seed = 0.4, 1234
    plain = reference.two_stream_attention(**x, **kw, return_probs=True)
    out_h, out_g = reference.two_stream_attention(**x, **kw, dropout_p=p_drop, seed=seed)
    P = kw["q_g"].shape[1]
    idx = torch.arange(B * H * Lq * Lk).view(B, H, Lq, Lk)
    keep_h = philox_uniform(seed, idx) >= p_drop
    keep_g = philox_uniform(seed, B * H * Lq * Lk + torch.arange(B * H * P * Lk).view(B, H, P, Lk)) >= p_drop
    want_h = torch.where(keep_h, plain[2] / (1 - p_drop), 0.0).permute(0, 2, 1, 3)
    want_g = (torch.where(keep_g, plain[3] / (1 - p_drop), 0.0).permute(0, 2, 1, 3)
              * (kw["target_pos"] >= 0)[..., None, None])
    torch.testing.assert_close(out_h, want_h)
    torch.testing.assert_close(out_g, want_g)
    assert 0.3 < 1 - keep_h.float().mean() < 0.5


def test_dropout_seed_reproducible_and_distinct():
    x, kw = make_inputs(features=("query", "rank"))
    a = two_stream_attention(**x, **kw, dropout_p=0.2, seed=5)
    b = two_stream_attention(**x, **kw, dropout_p=0.2, seed=5)
    c = two_stream_attention(**x, **kw, dropout_p=0.2, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(3)
    d = two_stream_attention(**x, **kw, dropout_p=0.2)
    torch.manual_seed(3)
    e = two_stream_attention(**x, **kw, dropout_p=0.2)
    assert torch.equal(d[0], e[0])


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
def test_empty_rows(empty_rows):
    """Rows with no visible key: zeros with zero gradient, or HF's mean of all values."""
    x, kw = make_inputs(B=1, Lq=4, M=0, features=("query",))
    kw["target_pos"] = torch.tensor([[0, 2, -1]])
    kw["attn_mask"] = torch.zeros(1, 4, 4, dtype=torch.bool)
    kw["attn_mask"][0, 2] = True  # row 2 sees nothing in the query stream
    for t in (x["q"], kw["q_g"], x["v"]):
        t.requires_grad_()
    out_h, out_g = reference.two_stream_attention(**x, **kw, empty_rows=empty_rows)
    want_row = torch.zeros_like(out_g[0, 1]) if empty_rows == "zero" else x["v"][0].mean(0)
    torch.testing.assert_close(out_g[0, 1], want_row)
    torch.testing.assert_close(out_g[0, 2], torch.zeros_like(out_g[0, 2]))  # padding row
    (out_g[0, 1].sum() + out_g[0, 2].sum()).backward()
    assert kw["q_g"].grad[0, 2].abs().max() == 0
    # "uniform" keeps HF's gradient through the softmax at the uniform point (tested against HF above)
    assert (kw["q_g"].grad[0, 1].abs().max() == 0) == (empty_rows == "zero")
    # the content row 2 still sees itself
    assert out_h[0, 2].abs().max() > 0


def test_rank_mask_equals_dense_mask_from_ranks():
    x, kw = make_inputs(B=2, Lq=9, M=3, features=("query", "rank"))
    q_rank, k_rank = kw.pop("q_rank"), kw.pop("k_rank")
    dense = ~(k_rank[:, None, :] < q_rank[:, :, None])
    a = reference.two_stream_attention(**x, **kw, q_rank=q_rank, k_rank=k_rank)
    b = reference.two_stream_attention(**x, **kw, attn_mask=dense)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_segment_ids_equal_dense_segments():
    x, kw = make_inputs(B=2, Lq=6, M=2, features=("query", "seg_ids"))
    dense = kw["seg_q"][:, :, None] != kw["seg_k"][:, None, :]
    a = reference.two_stream_attention(**x, **kw)
    kw.pop("seg_q"), kw.pop("seg_k")
    b = reference.two_stream_attention(**x, **kw, seg_diff=dense)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_strided_time_major_views_equal_contiguous():
    x, kw = make_inputs(B=3, Lq=5, M=2, features=("query", "seg_ids"))
    views = {n: t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() == 4 else t for n, t in x.items()}
    assert not views["q"].is_contiguous()
    a = two_stream_attention(**x, **kw)
    b = two_stream_attention(**views, **kw)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
