"""Fused ELECTRA backends (triton: ``kernels/rtd_loss.py``, ``kernels/linear_cross_entropy.py``; cpu:
``csrc/cpu/``) against the float64 reference with the spec's 2x rule, HF / the original ELECTRA formula,
and sampling checks.

Triton runs on the CPU interpreter (``TRITON_INTERPRET=1``, set by conftest) or on a GPU; outputs are
NaN-poisoned before launch (conftest), so an element a kernel forgets to write fails.
"""

import pytest
import torch
from conftest import DTYPE_ID, assert_policy, backend_reasons, fused_backend_params, skip_unsupported_dtype

from pyobjectives import linear_cross_entropy, rtd_loss
from pyobjectives.backends import triton_interpreter_enabled

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

#: The interpreter runs on CPU tensors; a GPU run (TRITON_INTERPRET=0) uses CUDA tensors.
DEV = "cpu" if triton_interpreter_enabled() or not torch.cuda.is_available() else "cuda"
#: The cpu backend takes CPU tensors, the cuda backend CUDA tensors: each runs where DEV is its device.
BACKENDS = [p for p in fused_backend_params("rtd_loss") if p.values[0] in ("triton", DEV)]
requires_triton = pytest.mark.skipif(bool(backend_reasons("triton", "rtd_loss")), reason="triton backend unavailable: "
                                     + "; ".join(backend_reasons("triton", "rtd_loss")))




def exact_dtype(backend):
    """Comparisons against the same-dtype reference run in float64 where the backend has it."""
    return torch.float32 if backend in ("cpu", "cuda") else torch.float64


def close(backend):
    """Same-dtype agreement with the reference: float64 to rounding; float32 to a few ulps of sums."""
    return dict(rtol=1e-12, atol=1e-12) if exact_dtype(backend) == torch.float64 else dict(rtol=2e-5, atol=2e-6)


def _lce_module():
    from pyobjectives.kernels import linear_cross_entropy as K
    return K


def run(fn, leaves: dict, fixed: dict, dtype, **kw):
    """Outputs and gradients of one call: float leaves cast to ``dtype`` (fresh leaves), every
    output weighted by a ramp so that per-element gradients differ."""
    xs = {n: t.detach().to(dtype).requires_grad_() for n, t in leaves.items()}
    out = fn(**xs, **fixed, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    diff = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()]
    ramps = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o) for o in diff]
    torch.autograd.backward([(o * r).sum() for o, r in zip(diff, ramps)])
    return out, {n: t.grad for n, t in xs.items()}


def check_policy(backend, fn, leaves, fixed, dtype, **kw):
    """Fused backend vs float64 reference: the 2x rule on the loss and every gradient; returns the three runs."""
    skip_unsupported_dtype(backend, dtype)
    got, got_g = run(fn, leaves, fixed, dtype, backend=backend, **kw)
    ref, ref_g = run(fn, leaves, fixed, dtype, backend="reference", **kw)
    orc, orc_g = run(fn, leaves, fixed, torch.float64, backend="reference", **kw)
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert first(got).dtype == dtype
    assert_policy("loss", first(got), first(ref), first(orc), dtype)
    for n in leaves:
        assert_policy(f"d {n}", got_g[n], ref_g[n], orc_g[n], dtype)
    return (got, got_g), (ref, ref_g), (orc, orc_g)


# --- RTD loss ---------------------------------------------------------------------------------

def rtd_inputs(lead, D=None, vocab=30, replace=0.3, pad=0.2, scale=3.0):
    original = torch.randint(0, vocab, lead)
    corrupted = torch.where(torch.rand(lead) < replace, torch.randint(0, vocab, lead), original)
    mask = (torch.rand(lead) >= pad).long()
    if D is None:
        leaves = dict(logits_or_hidden=torch.randn(lead, dtype=torch.float64) * scale)
    else:
        leaves = dict(logits_or_hidden=torch.randn(*lead, D, dtype=torch.float64),
                      head_weight=torch.randn(D, dtype=torch.float64) * scale / D**0.5,
                      head_bias=torch.randn((), dtype=torch.float64))
    fixed = dict(corrupted_ids=corrupted.to(DEV), original_ids=original.to(DEV), attention_mask=mask.to(DEV))
    return {n: t.to(DEV) for n, t in leaves.items()}, fixed


RTD_CASES = [((3, 37), None), ((53,), None), ((3, 37), 24), ((2, 19), 70), ((1, 5), 128)]


def _rtd_id(case):
    lead, D = case
    return ("logits" if D is None else f"head-D{D}") + "-" + "x".join(map(str, lead))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", RTD_CASES, ids=_rtd_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_policy(backend, case, reduction, dtype):
    leaves, fixed = rtd_inputs(*case)
    # ELECTRA's weight 50 on the mean; the sum / none keep magnitudes where fp32's absolute floor means something
    check_policy(backend, rtd_loss, leaves, fixed, dtype, reduction=reduction, loss_weight=50.0 if reduction == "mean" else 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=DTYPE_ID.get)
@pytest.mark.parametrize("D", [None, 24], ids=["logits", "head-D24"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_policy_fp16_fp64(backend, D, dtype):
    leaves, fixed = rtd_inputs((4, 29), D)
    check_policy(backend, rtd_loss, leaves, fixed, dtype)


@pytest.mark.parametrize("D", [None, 24], ids=["logits", "head-D24"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_stats_equal_reference(backend, D):
    leaves, fixed = rtd_inputs((5, 41), D)
    leaves = {n: t.to(exact_dtype(backend)) for n, t in leaves.items()}
    _, got = rtd_loss(**leaves, **fixed, return_stats=True, backend=backend)
    _, ref = rtd_loss(**leaves, **fixed, return_stats=True, backend="reference")
    assert set(got) == set(ref) == {"accuracy", "precision", "recall", "replaced", "tokens"}
    for k in ref:
        assert got[k].dtype == torch.float32 and got[k].shape == ()
        torch.testing.assert_close(got[k], ref[k].float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("D", [None, 24], ids=["logits", "head-D24"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_no_real_token_is_zero(backend, D):
    leaves, fixed = rtd_inputs((3, 11), D)
    fixed["attention_mask"] = torch.zeros_like(fixed["attention_mask"])
    for reduction in ("mean", "sum"):
        out, grads = run(rtd_loss, leaves, fixed, torch.float32, backend=backend, reduction=reduction,
                         return_stats=True)
        loss, stats = out
        assert loss.item() == 0.0
        assert all((g == 0).all() for g in grads.values())
        assert all(v.item() == 0.0 for v in stats.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_empty_input(backend):
    leaves, fixed = rtd_inputs((0, 7), 24)
    out, grads = run(rtd_loss, leaves, fixed, torch.float32, backend=backend)
    assert out.item() == 0.0 and grads["logits_or_hidden"].shape == (0, 7, 24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_layouts_strides_and_mask_dtypes(backend):
    """Transposed (time-major) hidden, sliced 3-D leading dims, int32 ids, bool / float / expanded masks."""
    B, L, D = 3, 13, 24
    dt = exact_dtype(backend)
    hid_t = torch.randn(L, B, D, dtype=dt, device=DEV)
    hidden = hid_t.transpose(0, 1)  # [B, L, D], not contiguous
    original = torch.randint(0, 9, (B, L), device=DEV)
    corrupted = torch.where(torch.rand(B, L, device=DEV) < 0.4, torch.randint(0, 9, (B, L), device=DEV), original)
    w, b = torch.randn(D, dtype=dt, device=DEV), torch.randn((), dtype=dt, device=DEV)
    real = torch.rand(B, L, device=DEV) > 0.3
    masks = [None, real, real.double(), real.float(), real.long(), real.int(), real.to(torch.uint8),
             real.to(torch.int16), (torch.rand(1, L, device=DEV) > 0.3).expand(B, L)]
    for mask in masks:
        for reduction in ("mean", "none"):
            args = (corrupted.int(), original, mask)
            got = rtd_loss(hidden, *args, head_weight=w, head_bias=b, reduction=reduction, backend=backend)
            want = rtd_loss(hidden, *args, head_weight=w, head_bias=b, reduction=reduction, backend="reference")
            torch.testing.assert_close(got, want, **close(backend))
    # three leading dims that cannot be collapsed to two strides (a sliced middle dim) -> copied
    z = torch.randn(4, 10, 6, dtype=dt, device=DEV)[:, ::3, :]
    ids_o = torch.randint(0, 5, (4, 10, 6), device=DEV)[:, ::3, :]
    ids_c = torch.randint(0, 5, (4, 10, 6), device=DEV)[:, ::3, :]
    torch.testing.assert_close(rtd_loss(z, ids_c, ids_o, backend=backend),
                               rtd_loss(z, ids_c, ids_o, backend="reference"), **close(backend))
    # a single logit (0-dim)
    z0 = torch.tensor(1.5, dtype=dt, device=DEV)
    one = torch.tensor(3, device=DEV)
    torch.testing.assert_close(rtd_loss(z0, one, one + 1, backend=backend),
                               rtd_loss(z0, one, one + 1, backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_gradcheck_fused_head(backend):
    skip_unsupported_dtype(backend, torch.float64)
    leaves, fixed = rtd_inputs((2, 3), 4)
    xs = [t.clone().requires_grad_() for t in leaves.values()]
    torch.autograd.gradcheck(lambda h, w, b: rtd_loss(h, **fixed, head_weight=w, head_bias=b, loss_weight=2.0,
                                                      backend=backend), xs)
    torch.autograd.gradcheck(lambda h, w, b: rtd_loss(h, **fixed, head_weight=w, head_bias=b, reduction="none",
                                                      backend=backend), xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_partial_requires_grad(backend):
    """Only the head weight / only the bias / only the hidden state require a gradient."""
    leaves, fixed = rtd_inputs((3, 17), 24)
    leaves = {n: t.to(exact_dtype(backend)) for n, t in leaves.items()}
    for wanted in ("logits_or_hidden", "head_weight", "head_bias"):
        for reduction in ("mean", "none"):
            xs = {n: t.clone().requires_grad_(n == wanted) for n, t in leaves.items()}
            loss = rtd_loss(**xs, **fixed, reduction=reduction, backend=backend)
            loss.sum().backward()
            ref = {n: t.clone().requires_grad_(n == wanted) for n, t in leaves.items()}
            rtd_loss(**ref, **fixed, reduction=reduction, backend="reference").sum().backward()
            torch.testing.assert_close(xs[wanted].grad, ref[wanted].grad, **close(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_rtd_matches_hf_and_original_formula(backend):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ElectraConfig(vocab_size=60, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=48)
    model = transformers.ElectraForPreTraining(cfg).eval().to(DEV)
    original = torch.randint(0, 60, (3, 17), device=DEV)
    corrupted = torch.where(torch.rand(3, 17, device=DEV) < 0.3, torch.randint(0, 60, (3, 17), device=DEV), original)
    mask = torch.ones(3, 17, dtype=torch.long, device=DEV)
    mask[1, -5:] = 0
    hf = model(input_ids=corrupted, attention_mask=mask, labels=(corrupted != original).long())
    torch.testing.assert_close(rtd_loss(hf.logits, corrupted, original, mask, backend=backend), hf.loss)
    head = model.discriminator_predictions
    body = model.electra(input_ids=corrupted, attention_mask=mask).last_hidden_state
    hidden = head.activation(head.dense(body))
    fused = rtd_loss(hidden, corrupted, original, mask, head_weight=head.dense_prediction.weight[0],
                     head_bias=head.dense_prediction.bias[0], backend=backend)
    torch.testing.assert_close(fused, hf.loss)
    # google-research/electra: sigmoid cross-entropy averaged over real tokens, weight 50
    z = hf.logits.detach().double()
    y = (corrupted != original).double()
    p = torch.sigmoid(z)
    formula = 50 * ((-(y * torch.log(p) + (1 - y) * torch.log1p(-p))) * mask).sum() / mask.sum()
    got = rtd_loss(hf.logits.detach(), corrupted, original, mask, loss_weight=50.0, backend=backend)
    assert abs(got.double().item() - formula.item()) <= 1e-5 * abs(formula.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@requires_triton
def test_rtd_cuda_graph_capture_no_host_sync():
    leaves, fixed = rtd_inputs((4, 64), 32)
    x = leaves["logits_or_hidden"].float().requires_grad_()
    w, b = leaves["head_weight"].float(), leaves["head_bias"].float()
    rtd_loss(x, **fixed, head_weight=w, head_bias=b, backend="triton").backward()  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = rtd_loss(x, **fixed, head_weight=w, head_bias=b, backend="triton")
    graph.replay()
    torch.testing.assert_close(loss, rtd_loss(x, **fixed, head_weight=w, head_bias=b, backend="reference"))


# --- linear cross-entropy -----------------------------------------------------------------------

def lce_inputs(N, E, V, bias=True, ignore_every=3):
    leaves = dict(hidden=torch.randn(N, E, dtype=torch.float64),
                  weight=torch.randn(V, E, dtype=torch.float64) / E**0.5)
    if bias:
        leaves["bias"] = torch.randn(V, dtype=torch.float64)
    targets = torch.randint(0, V, (N,))
    if ignore_every:
        targets[1::ignore_every] = -100
    return {n: t.to(DEV) for n, t in leaves.items()}, dict(targets=targets.to(DEV))


LCE_CASES = [  # (N, E, V, reduction, dtype)
    *[(1, 24, 11, r, d) for r in ("mean", "sum", "none") for d in (torch.float32, torch.bfloat16)],
    *[(53, 24, 997, r, d) for r in ("mean", "sum", "none") for d in (torch.float32, torch.bfloat16)],
    (53, 128, 997, "mean", torch.float32), (53, 128, 997, "none", torch.bfloat16),
    (3, 128, 30522, "mean", torch.float32), (3, 128, 30522, "none", torch.bfloat16),
]


def _lce_id(case):
    N, E, V, r, d = case
    return f"N{N}-E{E}-V{V}-{r}-{DTYPE_ID[d]}"


@pytest.mark.parametrize("case", LCE_CASES, ids=_lce_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_policy(backend, case):
    N, E, V, reduction, dtype = case
    leaves, fixed = lce_inputs(N, E, V)
    (got, _), (ref, _), _ = check_policy(backend, linear_cross_entropy, leaves, fixed, dtype, reduction=reduction,
                                         sample=True, seed=17)
    if dtype == torch.float32:
        assert torch.equal(got[1], ref[1]), "samples differ from the reference's for the same seed"
    else:  # 16-bit logits: the matmul's rounding to the input dtype may differ in a rare last bit
        assert (got[1] != ref[1]).sum().item() <= max(1, N // 50)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=DTYPE_ID.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_policy_fp16_fp64(backend, dtype):
    leaves, fixed = lce_inputs(29, 24, 301)
    check_policy(backend, linear_cross_entropy, leaves, fixed, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_no_bias_and_strided_inputs(backend):
    N, E, V = 21, 24, 211
    leaves, fixed = lce_inputs(N, E, V, bias=False)
    check_policy(backend, linear_cross_entropy, leaves, fixed, torch.float32)
    hidden = torch.randn(E, N, dtype=exact_dtype(backend), device=DEV).t()          # column-major
    weight = torch.randn(E, V, dtype=exact_dtype(backend), device=DEV).t() / E**0.5  # [V, E] view of [E, V]
    targets = torch.randint(0, V, (2 * N,), device=DEV)[::2]                  # strided targets
    for reduction in ("mean", "none"):
        got = linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend=backend)
        want = linear_cross_entropy(hidden, weight, targets, reduction=reduction, backend="reference")
        torch.testing.assert_close(got, want, **close(backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_all_rows_ignored_is_zero_not_nan(backend):
    leaves, fixed = lce_inputs(6, 24, 37)
    fixed["targets"] = torch.full_like(fixed["targets"], -100)
    for reduction in ("mean", "sum", "none"):
        out, grads = run(linear_cross_entropy, leaves, fixed, torch.float32, backend=backend, reduction=reduction)
        assert (out == 0).all() and torch.isfinite(out).all()
        assert all((g == 0).all() for g in grads.values())
    # and with sampling: every row is still sampled
    _, sampled = linear_cross_entropy(*[leaves[n].float() for n in ("hidden", "weight")], fixed["targets"],
                                      leaves["bias"].float(), sample=True, seed=3, backend=backend)
    _, want = linear_cross_entropy(*[leaves[n].float() for n in ("hidden", "weight")], fixed["targets"],
                                   leaves["bias"].float(), sample=True, seed=3, backend="reference")
    assert torch.equal(sampled, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_empty_rows(backend):
    leaves, fixed = lce_inputs(0, 24, 37)
    out, grads = run(linear_cross_entropy, leaves, fixed, torch.float32, backend=backend)
    assert out.item() == 0.0 and grads["weight"].abs().sum() == 0 and grads["hidden"].shape == (0, 24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_gradcheck(backend):
    skip_unsupported_dtype(backend, torch.float64)
    leaves, fixed = lce_inputs(5, 6, 13)
    xs = [leaves[n].clone().requires_grad_() for n in ("hidden", "weight", "bias")]
    torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, fixed["targets"], b, backend=backend), xs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_partial_requires_grad(backend):
    leaves, fixed = lce_inputs(19, 24, 97)
    leaves = {n: t.to(exact_dtype(backend)) for n, t in leaves.items()}
    for wanted in ("hidden", "weight", "bias"):
        xs = {n: t.clone().requires_grad_(n == wanted) for n, t in leaves.items()}
        linear_cross_entropy(**xs, **fixed, backend=backend).backward()
        ref = {n: t.clone().requires_grad_(n == wanted) for n, t in leaves.items()}
        linear_cross_entropy(**ref, **fixed, backend="reference").backward()
        torch.testing.assert_close(xs[wanted].grad, ref[wanted].grad, **close(backend))


@requires_triton
def test_lce_tilings_and_splits_agree(monkeypatch):
    """Samples are keyed on (seed, row, vocab id) only: other tile sizes and vocabulary splits
    (forward and d hidden) draw the same ids; losses and gradients agree to rounding."""
    K = _lce_module()
    leaves, fixed = lce_inputs(37, 40, 301)
    leaves = {n: t.float() for n, t in leaves.items()}
    base, base_g = run(linear_cross_entropy, leaves, fixed, torch.float32, backend="triton", sample=True, seed=9,
                       temperature=0.8)
    for override in (dict(fwd=(16, 32, 16), fwd_splits=3, dh=(16, 32, 16, 16), dh_splits=4, dw=(32, 16, 16, 32)),
                     dict(fwd=(64, 512, 64), fwd_splits=1, dh=(64, 128, 64, 64), dh_splits=2)):
        monkeypatch.setattr(K, "CONFIG_OVERRIDE", override)
        out, grads = run(linear_cross_entropy, leaves, fixed, torch.float32, backend="triton", sample=True, seed=9,
                         temperature=0.8)
        assert torch.equal(out[1], base[1])
        torch.testing.assert_close(out[0], base[0], rtol=1e-6, atol=1e-6)
        for n in grads:
            torch.testing.assert_close(grads[n], base_g[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_sampling_chi_square(backend, monkeypatch):
    """Many rows with identical logits: counts of the samples fit softmax(z / T) (6 dof, p > 1e-5);
    the disallowed id is never drawn and the rest renormalises."""
    if backend == "triton":  # one row tile holding many rows
        monkeypatch.setattr(_lce_module(), "CONFIG_OVERRIDE", dict(fwd=(512, 16, 16)))
    V, N, T = 7, 6000, 0.7
    weight = torch.randn(V, 3, device=DEV)
    bias = torch.randn(V, device=DEV)
    hidden = torch.randn(1, 3, device=DEV).expand(N, 3)
    targets = torch.zeros(N, dtype=torch.long, device=DEV)
    _, sampled = linear_cross_entropy(hidden, weight, targets, bias, sample=True, temperature=T, seed=11,
                                      backend=backend)
    probs = torch.softmax((hidden[0].double() @ weight.double().t() + bias.double()) / T, 0)
    observed = torch.bincount(sampled, minlength=V).double()
    chi2 = ((observed - probs * N) ** 2 / (probs * N)).sum().item()
    assert chi2 < 33.1, (chi2, observed, probs * N)  # P(chi2_6 > 33.1) = 1e-5
    banned = int(probs.argmax())
    _, sampled = linear_cross_entropy(hidden, weight, targets, bias, sample=True, temperature=T, seed=12,
                                      disallow=torch.full((N,), banned, device=DEV), backend=backend)
    assert (sampled != banned).all()
    rest = probs.clone()
    rest[banned] = 0
    rest /= rest.sum()
    observed = torch.bincount(sampled, minlength=V).double()
    keep = rest > 0
    chi2 = ((observed[keep] - rest[keep] * N) ** 2 / (rest[keep] * N)).sum().item()
    assert chi2 < 31.3, (chi2, observed, rest * N)  # 5 dof: P(chi2 > 31.3) = 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_seed_reproducibility_rows_keyed_on_original_index(backend):
    N, E, V = 40, 24, 101
    leaves, fixed = lce_inputs(N, E, V)
    h, w, b = (leaves[n].float() for n in ("hidden", "weight", "bias"))
    t = fixed["targets"]
    _, a = linear_cross_entropy(h, w, t, b, sample=True, seed=3, backend=backend)
    _, a2 = linear_cross_entropy(h, w, t, b, sample=True, seed=3, backend=backend)
    _, c = linear_cross_entropy(h, w, t, b, sample=True, seed=4, backend=backend)
    assert torch.equal(a, a2) and not torch.equal(a, c)
    assert torch.equal(a, linear_cross_entropy(h, w, t, b, sample=True, seed=3, backend="reference")[1])
    # ignore rows reorder the kernel's rows (compaction) but not the noise: same ids without them
    _, no_ignore = linear_cross_entropy(h, w, t.clamp(min=0), b, sample=True, seed=3, backend=backend)
    assert torch.equal(no_ignore, a)
    # a prefix of the rows draws the same ids; a large seed works
    assert torch.equal(linear_cross_entropy(h[:10], w, t[:10], b, sample=True, seed=3, backend=backend)[1], a[:10])
    big = 2**63 - 5
    assert torch.equal(linear_cross_entropy(h, w, t, b, sample=True, seed=big, backend=backend)[1],
                       linear_cross_entropy(h, w, t, b, sample=True, seed=big, backend="reference")[1])
    # disallow excludes exactly that id; temperature changes sampling only
    _, d = linear_cross_entropy(h, w, t, b, sample=True, seed=3, disallow=a, backend=backend)
    assert (d != a).all()
    assert torch.equal(d, linear_cross_entropy(h, w, t, b, sample=True, seed=3, disallow=a, backend="reference")[1])
    cold = linear_cross_entropy(h, w, t, b, sample=True, seed=3, temperature=0.05, backend=backend)
    torch.testing.assert_close(cold[0], linear_cross_entropy(h, w, t, b, backend=backend))
    assert torch.equal(cold[1], linear_cross_entropy(h, w, t, b, sample=True, seed=3, temperature=0.05,
                                                     backend="reference")[1])


@requires_triton
def test_lce_argmax_from_the_same_sweep():
    K = _lce_module()
    leaves, fixed = lce_inputs(33, 24, 211)
    h, w, b = (leaves[n].float() for n in ("hidden", "weight", "bias"))
    loss, sampled, argmax = K.linear_cross_entropy(h, w, fixed["targets"], b, sample=True, seed=1,
                                                   return_argmax=True)
    assert torch.equal(argmax, (h @ w.t() + b).argmax(1))
    loss2, argmax2 = K.linear_cross_entropy(h, w, fixed["targets"], b, return_argmax=True)
    assert torch.equal(argmax2, argmax) and torch.equal(loss2, loss)



# --- compiled for an H100 without one -------------------------------------------------------------

_SM90_COMPILE = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import pyobjectives.kernels.rtd_loss as R
import pyobjectives.kernels.linear_cross_entropy as K
R._interpreting = K._interpreting = lambda: False
R._sm_count = K._sm_count = lambda index: 132
P = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
dev = torch.device("cuda", 0)
failed = []

def build(name, fn, sig, consts, num_warps, num_stages=2):
    signature = {a: ("constexpr" if a in consts else sig[a]) for a in fn.arg_names}
    try:
        triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {str(exc)[:500]}")

for dt in (torch.bfloat16, torch.float32):
    acc = torch.float32
    for head, D in ((False, 1), (True, 768)):
        cfg = R._config(D, head, dt, dev)
        chunks = max(1, triton.cdiv(D, cfg["BLOCK_D"]))
        sig = dict(x_ptr=P[dt], w_ptr=P[dt], b_ptr=P[dt], c_ptr="*i64", o_ptr="*i64", m_ptr="*u8", tok_ptr=P[dt],
                   g_ptr=P[acc], part_ptr="*fp64", dwp_ptr=P[acc], T="i32", L="i32", D="i32", n_blocks="i32",
                   sx0="i64", sx1="i64", sxd="i64", sc0="i64", sc1="i64", so0="i64", so1="i64", sm0="i64",
                   sm1="i64", loss_weight="fp32")
        build(f"rtd fwd {dt} D={D}", R._rtd_fwd_kernel, sig, dict(
            HEAD=head, HAS_BIAS=head, HAS_MASK=True, STORE_TOK=True, GRAD=True, STORE_G=True, DW=head,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], D_CHUNKS=chunks, ACC=R._TL[acc], INTERP=False),
            cfg["num_warps"])
        if head:
            sig = dict(g_ptr=P[acc], s_ptr=P[acc], s_stride="i32", w_ptr=P[dt], x_ptr=P[dt], dx_ptr=P[dt],
                       dwp_ptr=P[acc], T="i32", L="i32", D="i32", n_blocks="i32", sx0="i64", sx1="i64", sxd="i64")
            build(f"rtd bwd {dt}", R._rtd_bwd_kernel, sig, dict(
                DX=True, DW=True, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], D_CHUNKS=chunks, ACC=R._TL[acc],
                INTERP=False), cfg["num_warps"])
    cfg = K._config(20224, 768, 30522, dt, dev)
    acc_t, dot_t, prec = K._TL[acc], K._TL[dt], ("ieee" if dt == torch.float32 else None)
    common = dict(IN_DT=K._TL[dt], DOT_DT=dot_t, PREC=prec, ACC=acc_t, INTERP=False, HAS_BIAS=True)
    strides = dict(N="i32", V="i32", E="i32", s_hn="i32", s_he="i32", s_wv="i32", s_we="i32", s_t="i32")
    rows = dict(h_ptr=P[dt], w_ptr=P[dt], b_ptr=P[dt], tgt_ptr="*i64", order_ptr="*i32", nkeep_ptr="*i32")
    BN, BV, BE = cfg["fwd"]
    build(f"lce fwd {dt}", K._lce_fwd_kernel, dict(
        rows, dis_ptr="*i64", lse_ptr=P[acc], tgl_ptr=P[acc], smax_ptr="*fp32", sidx_ptr="*i32", amax_ptr=P[acc],
        aidx_ptr="*i32", seed="i64", temperature="fp32", tiles_per_split="i32", s_dis="i32", **strides),
        dict(common, SAMPLE=True, ARGMAX=True, HAS_DIS=True, BLOCK_N=BN, BLOCK_V=BV, BLOCK_E=BE),
        cfg["num_warps"], cfg["num_stages"])
    BN, BV, BE, BEO = cfg["dh"]
    build(f"lce dh {dt}", K._lce_bwd_dh_kernel, dict(
        rows, lse_ptr=P[acc], coef_ptr=P[acc], dh_ptr=P[dt], tiles_per_split="i32", coef_stride="i32", **strides),
        dict(common, PARTIAL=False, BLOCK_N=BN, BLOCK_V=BV, BLOCK_E=BE, BLOCK_EO=BEO),
        cfg["num_warps"], cfg["num_stages"])
    BN, BV, BE, BEO = cfg["dw"]
    build(f"lce dw {dt}", K._lce_bwd_dw_kernel, dict(
        rows, lse_ptr=P[acc], coef_ptr=P[acc], dw_ptr=P[dt], db_ptr=P[dt], coef_stride="i32", **strides),
        dict(common, DW=True, DB=True, BLOCK_N=BN, BLOCK_V=BV, BLOCK_E=BE, BLOCK_EO=BEO),
        cfg["num_warps"], cfg["num_stages"])
print("\n".join(failed) or "all compiled")
sys.exit(1 if failed else 0)
'''


@requires_triton
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check GPU lowering: compile every kernel (bf16 and fp32, the
    H100 block sizes) down to a cubin for sm_90 with Triton's bundled ptxas, no device needed."""
    import os
    import subprocess
    import sys

    import triton
    if not hasattr(triton, "compile") or not os.path.exists(
            os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton build has no bundled NVIDIA ptxas")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lce_samples_with_wide_logits_equal_reference(backend):
    """Logits spread far wider than the largest Gumbel noise (as a trained generator's are): kernels that
    skip hopeless vocabulary blocks must still draw exactly the reference's samples."""
    N, E, V = 23, 16, 3001
    h = torch.randn(N, E, device=DEV)
    w = torch.randn(V, E, device=DEV) * 4.0
    t = torch.randint(0, V, (N,), device=DEV)
    for temperature in (1.0, 0.3, 5.0):
        _, got = linear_cross_entropy(h, w, t, sample=True, seed=5, temperature=temperature, backend=backend)
        _, want = linear_cross_entropy(h, w, t, sample=True, seed=5, temperature=temperature, backend="reference")
        assert torch.equal(got, want)
