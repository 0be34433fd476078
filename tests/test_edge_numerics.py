"""Edge numerics on every backend (reference, triton, cpu): rows with no visible key, scores around
+-1e4, half-precision inputs whose products overflow half precision, degenerate sizes (L = 1, P = 0,
Lk = M + 1, a vocabulary of 1), all-padding / all-ignored batches, tiny and huge sampling temperatures,
and NaN inputs.

Finite cases follow the spec's tolerance policy (float64 oracle, same-dtype reference); the reference
itself is checked too (finite, and equal to the oracle within the same policy). NaN cases follow the
reference, which is the spec: a fused backend's ``torch.isnan`` pattern must equal the reference's
element for element (docs/backends.md, "NaN inputs").
"""

import pytest
import torch
from attention_inputs import make_inputs
from conftest import DTYPE_ID, assert_policy, backend_device, fused_backend_params
from test_attention_backends import GRAD_NAMES, check_against_reference, on_device
from test_electra_backends import check_policy, lce_inputs, rtd_inputs
from test_electra_backends import run as electra_run

from pyobjectives import linear_cross_entropy, reference, rtd_loss, two_stream_attention
from pyobjectives.backends import BACKENDS as REGISTRY
from pyobjectives.reference.philox import philox_uniform

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

NAN = float("nan")
ATTN_BACKENDS = [pytest.param("reference", id="reference")] + fused_backend_params()
ELECTRA_BACKENDS = ([pytest.param("reference", id="reference")]
                    + [p for p in fused_backend_params("rtd_loss") if backend_device(p.values[0]) == "cpu"])


# --- attention: finite edge cases ---------------------------------------------------------------

def empty_row_inputs():
    """Rows with no visible key in both streams: batch 1 is all padding; in batch 0, content rows
    see only keys of lower rank (rank 0 rows see nothing) and query rows at rank-0 positions too."""
    x, kw = make_inputs(B=2, Lq=9, M=3, H=2, D=8, P=4, features=("query", "rank", "padding"))
    kw["key_padding_mask"][1] = True
    kw["q_rank"][0, :3] = 0
    kw["target_pos"][0, :2] = torch.tensor([0, 2])
    return x, dict(kw, content_sees_self=False)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["nodrop", "drop0.3"])
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_rows_without_visible_keys(backend, empty_rows, dropout_p):
    x, kw = empty_row_inputs()
    ref = reference.two_stream_attention(**x, **kw)
    assert (ref[0][1] == 0).all() and (ref[1][1] == 0).all(), "batch 1 must be all empty rows"
    check_against_reference(backend, x, kw, torch.float32, empty_rows=empty_rows, dropout_p=dropout_p, seed=11)


@pytest.mark.parametrize("shift", [-1e4, 1e4], ids=["minus1e4", "plus1e4"])
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_scores_shifted_by_1e4(backend, shift):
    """A T5 bias of +-1e4 moves every score by +-1e4: exp must be taken after the row max is removed."""
    x, kw = make_inputs(B=2, Lq=11, M=2, H=2, D=8, P=3, features=("query", "rank", "t5"))
    kw["t5_bias"] = kw["t5_bias"] + shift
    check_against_reference(backend, x, kw, torch.float32)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_scores_spread_over_1e4(backend):
    """Scores of magnitude 1e4 with both signs: softmax is nearly one-hot, gradients nearly zero."""
    x, kw = make_inputs(B=2, Lq=11, M=2, H=2, D=8, P=3, features=("query", "causal", "seg_ids"))
    x["q"], x["k"], kw["q_g"] = x["q"] * 100, x["k"] * 100, kw["q_g"] * 100
    check_against_reference(backend, x, kw, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_rows_with_one_visible_key_have_zero_score_gradient(backend, dtype):
    """A row that sees one key has probability exactly 1 there: its output is that value row and every
    gradient through its scores (q, q_g, k, r, the biases) is 0, as autograd's softmax backward gives
    (ds = p * (dp - delta) cancels exactly only if delta and dp are formed alike)."""
    x, kw = make_inputs(B=2, Lq=13, M=3, H=2, D=16, P=5, features=("query",))
    Lk = x["k"].shape[1]
    keep = torch.randint(0, Lk, (2, 13))
    kw["attn_mask"] = torch.ones(2, 13, Lk, dtype=torch.bool).scatter_(2, keep[..., None], False)
    kw["content_sees_self"] = False
    device = backend_device(backend)
    out, grads = outputs_and_grads(two_stream_attention, x, kw, dtype, device, backend=backend)
    v = x["v"].to(device, dtype)
    assert torch.equal(out[0], v.gather(1, keep.to(device)[..., None, None].expand(-1, -1, *v.shape[2:])))
    for name in ("q", "q_g", "k", "r", "r_w_bias", "r_r_bias"):
        assert grads[name].abs().max().item() <= 1e-5, f"grad {name}: {grads[name].abs().max().item():.3e}"


def exactly(x, dtype):
    """Inputs representable in ``dtype``, so that the float64 oracle sees the values the backend sees."""
    return {n: (t.to(dtype).double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in x.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_half_inputs_whose_dot_overflows_half(backend, dtype):
    """q.k ~ 1.6e5 > 65504: an fp16 dot product overflows, the scaled score (~4e4) does not. Backends
    accumulate in float32 and scale there. The eager fp16 reference overflows itself, so its float32
    upcast (same inputs, float32 math) stands in for the same-dtype reference; bf16 does not overflow and
    keeps the policy's same-dtype reference."""
    if backend == "reference":
        pytest.skip("the reference computes in the input dtype (upcast=True is the float32 path)")
    x, kw = make_inputs(B=2, Lq=9, M=2, H=2, D=16, P=3, features=("query", "rank"))
    x["q"], x["k"] = 70 * x["q"].abs() + 30, 70 * x["k"].abs() + 30
    kw["q_g"] = 70 * kw["q_g"].abs() + 30
    x, kw = exactly(x, dtype), exactly(kw, dtype)
    plain = reference.two_stream_attention(**{n: t.to(dtype) for n, t in x.items()},
                                           **{n: (t.to(dtype) if n == "q_g" else t) for n, t in kw.items()})
    if dtype == torch.float16:
        assert not torch.isfinite(plain[0]).all(), "the fp16 reference was meant to overflow here"
    device = backend_device(backend)
    oracle_out, oracle_g = outputs_and_grads(reference.two_stream_attention, x, kw, torch.float64, device)
    up_out, up_g = outputs_and_grads(reference.two_stream_attention, x, kw, dtype, device,
                                     upcast=dtype == torch.float16)
    out, grads = outputs_and_grads(two_stream_attention, x, kw, dtype, device, backend=backend)
    for name, o, r, w in zip(("out_h", "out_g"), out, up_out, oracle_out):
        assert_policy(name, o, r, w, dtype)
    for name in oracle_g:
        assert_policy(f"grad {name}", grads[name], up_g[name], oracle_g[name], dtype)


def outputs_and_grads(fn, x, kw, dtype, device, **extra):
    """As test_attention_backends.run, for any attention function (here: the upcast reference)."""
    leaves = {n: (x[n] if n in x else kw[n]).detach().to(device, dtype).requires_grad_()
              for n in GRAD_NAMES if n in x or n in kw}
    rest = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in {**x, **kw}.items()
            if n not in leaves}
    outs = [o for o in fn(**leaves, **rest, **extra) if o is not None]
    gen = torch.Generator().manual_seed(123)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device, o.dtype) for o in outs]
    torch.autograd.backward([(o * w).sum() for o, w in zip(outs, weights)])
    return outs, {n: t.grad for n, t in leaves.items()}


SIZES = {
    "L1": dict(B=2, Lq=1, M=0, P=1),
    "L1-M6-Lk=M+1": dict(B=2, Lq=1, M=6, P=1),
    "L5-M4-causal": dict(B=1, Lq=5, M=4, P=2, features=("query", "causal")),
}


@pytest.mark.parametrize("case", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_degenerate_sizes(backend, case):
    case = dict(case)
    features = case.pop("features", ("query", "seg_ids", "t5"))
    x, kw = make_inputs(H=2, D=8, features=features, **case)
    check_against_reference(backend, x, kw, torch.float32)
    check_against_reference(backend, x, kw, torch.float32, dropout_p=0.5, seed=3)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_query_stream_with_no_rows(backend):
    """P = 0: q_g [B, 0, H, D]; out_g is empty and the content stream is unaffected."""
    x, kw = make_inputs(B=2, Lq=7, M=1, H=2, D=8, features=("rank",))
    kw.update(q_g=torch.randn(2, 0, 2, 8, dtype=torch.float64), target_pos=torch.zeros(2, 0, dtype=torch.long))
    check_against_reference(backend, x, kw, torch.float32)
    out = two_stream_attention(**{n: t.float() for n, t in on_device(x, backend).items()},
                               **{n: (t.float() if n == "q_g" else t) for n, t in on_device(kw, backend).items()},
                               backend=backend)
    assert out[1].shape == (2, 0, 2, 8)


@pytest.mark.parametrize("content_sees_self", [True, False], ids=["sees_self", "no_self"])
@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_all_tokens_padding(backend, empty_rows, content_sees_self):
    """Every key is padding: content rows see only themselves (XLNet) or nothing; query rows nothing."""
    x, kw = make_inputs(B=2, Lq=6, M=2, H=2, D=8, P=3, features=("query", "padding"))
    kw["key_padding_mask"][:] = True
    check_against_reference(backend, x, kw, torch.float32, empty_rows=empty_rows,
                            content_sees_self=content_sees_self)


# --- ELECTRA: finite edge cases -----------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("D", [None, 8], ids=["logits", "head-D8"])
@pytest.mark.parametrize("backend", ELECTRA_BACKENDS)
def test_rtd_all_padding(backend, D, reduction):
    leaves, fixed = rtd_inputs((3, 7), D)
    fixed["attention_mask"] = torch.zeros_like(fixed["attention_mask"])
    check_policy(backend, rtd_loss, leaves, fixed, torch.float32, reduction=reduction)
    out, grads = electra_run(rtd_loss, leaves, fixed, torch.float32, backend=backend, reduction=reduction)
    assert (out == 0).all() and all((g == 0).all() for g in grads.values())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("D", [None, 8], ids=["logits", "head-D8"])
@pytest.mark.parametrize("backend", ELECTRA_BACKENDS)
def test_rtd_logits_around_1e4(backend, D, reduction):
    leaves, fixed = rtd_inputs((3, 17), D, scale=1e4)
    check_policy(backend, rtd_loss, leaves, fixed, torch.float32, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("backend", ELECTRA_BACKENDS)
def test_rtd_head_large_half_inputs(backend, dtype):
    """Half-precision hidden states of magnitude 100: logits of 1e3 - 1e4 (backends accumulate in float32)."""
    leaves, fixed = rtd_inputs((2, 9), 8)
    leaves["logits_or_hidden"] = (leaves["logits_or_hidden"] * 100).to(dtype).double()
    leaves["head_weight"] = (leaves["head_weight"] * 10).to(dtype).double()
    check_policy(backend, rtd_loss, leaves, fixed, dtype, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ELECTRA_BACKENDS)
def test_lce_every_row_ignored(backend, reduction):
    leaves, fixed = lce_inputs(5, 8, 11)
    fixed["targets"] = torch.full_like(fixed["targets"], -100)
    check_policy(backend, linear_cross_entropy, leaves, fixed, torch.float32, reduction=reduction)


@pytest.mark.parametrize("backend", ELECTRA_BACKENDS)
def test_lce_vocabulary_of_one(backend):
    leaves, fixed = lce_inputs(6, 8, 1)
    (loss, sampled), grads = electra_run(linear_cross_entropy, leaves, fixed, torch.float32, backend=backend,
                                         reduction="none", sample=True, seed=4)
    assert (loss == 0).all() and (sampled == 0).all()
    check_policy(backend, linear_cross_entropy, leaves, fixed, torch.float32, reduction="none")


@pytest.mark.parametrize("temperature", [1e-6, 1e6], ids=["T1e-6", "T1e6"])
@pytest.mark.parametrize("backend", ELECTRA_BACKENDS)
def test_lce_extreme_temperatures(backend, temperature):
    """Sampling at T = 1e-6 is the argmax of the logits, at T = 1e6 the argmax of the noise: the same ids
    as the reference either way, and the loss does not depend on T."""
    leaves, fixed = lce_inputs(9, 8, 37)
    got, ref, _ = check_policy(backend, linear_cross_entropy, leaves, fixed, torch.float32, sample=True,
                               temperature=temperature, seed=21)
    assert torch.equal(got[0][1], ref[0][1])
    h, w, b = (leaves[n].float() for n in ("hidden", "weight", "bias"))
    logits = h @ w.t() + b
    if temperature < 1:
        assert torch.equal(got[0][1], logits.argmax(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("backend", ELECTRA_BACKENDS)
def test_lce_large_half_inputs(backend, dtype):
    """Half-precision hidden states and weights of magnitude 100: products of 1e4, logits of 1e3 - 1e4."""
    leaves, fixed = lce_inputs(64, 8, 13)  # many rows: the max rounding error of d weight is not a lottery
    for n in ("hidden", "weight", "bias"):
        leaves[n] = (leaves[n] * 100).to(dtype).double()
    check_policy(backend, linear_cross_entropy, leaves, fixed, dtype, reduction="none")


@pytest.mark.parametrize("backend", ELECTRA_BACKENDS)
def test_lce_logits_around_1e4(backend):
    leaves, fixed = lce_inputs(7, 8, 29)
    leaves["hidden"] = leaves["hidden"] * 3e3  # weight ~ 1 / sqrt(E): logits ~ 3e3 - 1e4
    got, ref, _ = check_policy(backend, linear_cross_entropy, leaves, fixed, torch.float32, reduction="none",
                               sample=True, seed=8)
    assert torch.equal(got[0][1], ref[0][1])


# --- NaN inputs ---------------------------------------------------------------------------------

def nan_pattern_equal(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got_nan, want_nan = torch.isnan(got), torch.isnan(want)
    assert torch.equal(got_nan, want_nan), (
        f"{name}: NaN at {got_nan.nonzero().tolist()[:8]}, the reference at {want_nan.nonzero().tolist()[:8]}")
    both = ~want_nan
    torch.testing.assert_close(got[both], want[both].to(got.dtype), rtol=1e-4, atol=1e-5)


# (feature set, tensor, index set to NaN, extra keyword arguments)
ATTN_NAN = {
    "q-row": (("query",), "q", (0, 2, 1, 3), {}),
    "q-row-masked-rank": (("query", "rank"), "q", (1, 4, 0, 0), {}),
    "qg-row": (("query", "rank"), "q_g", (1, 1, 1, 2), {}),
    "k-row-causal": (("query", "causal"), "k", (0, 5, 1, 0), {}),
    "k-row-padding-key": (("query", "padding"), "k", (1, 3, 0, 1), {}),
    "k-row-rank": (("query", "rank"), "k", (0, 6, 0, 0), {}),
    "v-element": (("query", "causal"), "v", (1, 4, 1, 5), {}),
    "r-row": (("query",), "r", (9, 0, 2), {}),
    "r-row-causal-short": (("query", "causal"), "r", (3, 1, 0), {}),
    "r_w_bias": (("query", "rank"), "r_w_bias", (1, 0), {}),
    "r_r_bias": (("query",), "r_r_bias", (0, 7), {}),
    "seg_embed-same": (("query", "seg_ids"), "seg_embed", (0, 1, 1), {}),
    "t5-bucket": (("query", "t5"), "t5_bias", (3, 0), {}),
    "q-row-dropout": (("query", "rank"), "q", (0, 5, 1, 1), dict(dropout_p=0.6, seed=5)),
    "k-row-dropout": (("query", "causal"), "k", (1, 2, 0, 4), dict(dropout_p=0.5, seed=6)),
    "k-row-uniform": (("query", "rank", "padding"), "k", (0, 3, 1, 2), dict(empty_rows="uniform")),
    "k-row-uniform-dropout": (("query", "rank"), "k", (1, 5, 0, 0), dict(empty_rows="uniform", dropout_p=0.3,
                                                                        seed=2)),
    "q-row-no-self": (("query", "padding"), "q", (0, 1, 0, 0), dict(content_sees_self=False)),
}


@pytest.mark.parametrize("case", ATTN_NAN.values(), ids=ATTN_NAN.keys())
@pytest.mark.parametrize("backend", fused_backend_params())
def test_attention_nan_pattern_equals_reference(backend, case):
    features, name, index, extra = case
    x, kw = make_inputs(B=2, Lq=8, M=2, H=2, D=8, P=4, dtype=torch.float32, features=features)
    (x if name in x else kw)[name][index] = NAN
    x, kw = on_device(x, backend), on_device(kw, backend)
    want = reference.two_stream_attention(**x, **kw, **extra)
    assert torch.isnan(want[0]).any() or torch.isnan(want[1]).any(), "the case must produce a NaN somewhere"
    leaves = {n: t.detach().clone().requires_grad_() for n, t in {**x, **kw}.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    got = two_stream_attention(**{**x, **kw, **leaves}, **extra, backend=backend)
    nan_pattern_equal("out_h", got[0], want[0])
    nan_pattern_equal("out_g", got[1], want[1])
    (got[0].sum() + got[1].sum()).backward()  # gradients may be NaN; they must not crash or hang


def test_reference_nan_semantics():
    """What the spec says, on the reference (the backends are compared to it above)."""
    x, kw = make_inputs(B=2, Lq=6, M=2, H=2, D=4, P=3, dtype=torch.float32, features=("query", "causal"))
    kw["target_pos"] = torch.tensor([[0, 4, -1], [5, 1, 3]])
    base = lambda: ({n: t.clone() for n, t in x.items()}, kw)  # noqa: E731

    # q[b, i, h]: exactly content row (b, i, h) is NaN
    xs, _ = base()
    xs["q"][1, 3, 0, 2] = NAN
    out_h, out_g = reference.two_stream_attention(**xs, **kw)
    expect = torch.zeros(2, 6, 2, 4, dtype=torch.bool)
    expect[1, 3, 0] = True
    assert torch.equal(torch.isnan(out_h), expect) and not torch.isnan(out_g).any()

    # k[b, j, h]: the rows of head h that see key j (causal: position M + i >= j); padding rows stay 0
    xs, _ = base()
    j = 5
    xs["k"][0, j, 1, 0] = NAN
    out_h, out_g = reference.two_stream_attention(**xs, **kw)
    sees = torch.arange(6) + 2 >= j
    assert torch.equal(torch.isnan(out_h[0, :, 1]).all(-1), sees) and not torch.isnan(out_h[1]).any()
    assert not torch.isnan(out_h[0, :, 0]).any()
    assert torch.isnan(out_g[0, :, 1]).all(-1).tolist() == [False, True, False]
    assert (out_g[0, 2] == 0).all()

    # v[b, j, h, d]: column d of every row of (b, h), seen or not (0 * NaN in the product), but padding rows
    xs, _ = base()
    xs["v"][1, 7, 0, 3] = NAN
    out_h, out_g = reference.two_stream_attention(**xs, **kw)
    expect = torch.zeros(2, 6, 2, 4, dtype=torch.bool)
    expect[1, :, 0, 3] = True
    assert torch.equal(torch.isnan(out_h), expect)
    expect_g = torch.zeros(2, 3, 2, 4, dtype=torch.bool)
    expect_g[1, :, 0, 3] = True
    assert torch.equal(torch.isnan(out_g), expect_g)

    # a NaN row stays NaN even when dropout drops every key of it (as F.dropout keeps NaN)
    xs, _ = base()
    xs["q"][0, 0, 0, 0] = NAN
    assert (philox_uniform(1, torch.arange(8)) < 0.999).all()  # row (b 0, h 0, i 0): keys 0..7 all dropped
    out_h, _ = reference.two_stream_attention(**xs, **kw, dropout_p=0.999, seed=1)
    assert torch.isnan(out_h[0, 0, 0]).all()


RTD_NAN = {
    "logit-real": (None, (0, 2), {}),
    "logit-padding": (None, (1, 4), {}),
    "hidden-real": (6, (0, 1, 3), {}),
    "hidden-padding": (6, (1, 4, 0), {}),
    "head_weight": (6, "head_weight", {}),
    "head_bias": (6, "head_bias", {}),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", RTD_NAN.values(), ids=RTD_NAN.keys())
@pytest.mark.parametrize("backend", fused_backend_params("rtd_loss"))
def test_rtd_nan_pattern_equals_reference(backend, case, reduction):
    D, where, _ = case
    leaves, fixed = rtd_inputs((2, 7), D)
    fixed["attention_mask"][1, 4] = 0
    fixed["attention_mask"][0, :4] = 1
    leaves = {n: t.float() for n, t in leaves.items()}
    if isinstance(where, str):
        leaves[where].view(-1)[0] = NAN
    else:
        leaves["logits_or_hidden"][where] = NAN
    want, want_stats = rtd_loss(**leaves, **fixed, reduction=reduction, return_stats=True, backend="reference")
    got_leaves = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    got, stats = rtd_loss(**got_leaves, **fixed, reduction=reduction, return_stats=True, backend=backend)
    nan_pattern_equal("loss", got, want)
    for k in want_stats:
        assert torch.equal(stats[k], want_stats[k].float()), k
    got.sum().backward()


LCE_NAN = {
    "hidden-kept-row": ("hidden", (1, 2), None),
    "hidden-ignored-row": ("hidden", (2, 0), None),
    "weight-rows": ("weight", [(4, 1), (9, 0)], None),
    "weight-row-disallowed": ("weight", [(4, 1), (9, 0)], 4),
    "bias": ("bias", (6,), None),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", LCE_NAN.values(), ids=LCE_NAN.keys())
@pytest.mark.parametrize("backend", fused_backend_params("linear_cross_entropy"))
def test_lce_nan_pattern_equals_reference(backend, case, reduction):
    """Loss NaN where the reference's is; samples and argmax as torch.argmax (the first NaN wins)."""
    name, index, banned = case
    leaves, fixed = lce_inputs(5, 6, 11)
    fixed["targets"][2] = -100
    leaves = {n: t.float() for n, t in leaves.items()}
    for i in (index if isinstance(index, list) else [index]):
        leaves[name][i] = NAN
    disallow = None if banned is None else torch.full((5,), banned, dtype=torch.long)
    kw = dict(reduction=reduction, sample=True, seed=13, disallow=disallow)
    want, want_ids = linear_cross_entropy(**leaves, **fixed, **kw, backend="reference")
    got_leaves = {n: t.clone().requires_grad_() for n, t in leaves.items()}
    got, ids = linear_cross_entropy(**got_leaves, **fixed, **kw, backend=backend)
    nan_pattern_equal("loss", got, want)
    assert torch.equal(ids, want_ids), f"samples {ids.tolist()} != reference {want_ids.tolist()}"
    got.sum().backward()
    impl = REGISTRY[backend].implementation("linear_cross_entropy")
    with torch.no_grad():
        argmax = impl(**leaves, **fixed, reduction=reduction, return_argmax=True)[-1]
    logits = leaves["hidden"] @ leaves["weight"].t() + leaves["bias"]
    assert torch.equal(argmax, logits.argmax(1))
