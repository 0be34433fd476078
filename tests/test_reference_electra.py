"""ELECTRA references: RTD loss against HF ElectraForPreTraining and the original formula;
linear cross-entropy against torch; Gumbel-max sampling statistics and reproducibility."""

import math

import pytest
import torch

from pyobjectives import linear_cross_entropy, reference, rtd_loss

transformers = pytest.importorskip("transformers")
from transformers import ElectraConfig, ElectraForPreTraining  # noqa: E402


def rtd_batch(B=3, L=17, vocab=50, replace=0.3):
    original = torch.randint(0, vocab, (B, L))
    corrupted = torch.where(torch.rand(B, L) < replace, torch.randint(0, vocab, (B, L)), original)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -5:] = 0
    return corrupted, original, mask


def electra_formula(z, corrupted, original, mask):
    """google-research/electra: sigmoid cross-entropy, averaged over real tokens (float64, independent form)."""
    z = z.double()
    y = (corrupted != original).double()
    p = torch.sigmoid(z)
    per = -(y * torch.log(p) + (1 - y) * torch.log1p(-p))
    return (per * mask).sum() / mask.sum()


def test_rtd_matches_hf_electra_for_pretraining():
    cfg = ElectraConfig(vocab_size=60, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48)
    model = ElectraForPreTraining(cfg).eval()
    corrupted, original, mask = rtd_batch(vocab=60)
    labels = (corrupted != original).long()
    hf = model(input_ids=corrupted, attention_mask=mask, labels=labels)
    # logits form
    torch.testing.assert_close(rtd_loss(hf.logits, corrupted, original, mask), hf.loss)
    # fused-head form: the hidden state that enters dense_prediction
    body = model.electra(input_ids=corrupted, attention_mask=mask).last_hidden_state
    head = model.discriminator_predictions
    hidden = head.activation(head.dense(body))
    fused = rtd_loss(hidden, corrupted, original, mask, head_weight=head.dense_prediction.weight[0],
                     head_bias=head.dense_prediction.bias[0])
    torch.testing.assert_close(fused, hf.loss)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["fp64", "fp32", "bf16"])
def test_rtd_matches_original_formula(dtype):
    corrupted, original, mask = rtd_batch(B=4, L=33)
    z = torch.randn(4, 33, dtype=torch.float64) * 3
    got = rtd_loss(z.to(dtype), corrupted, original, mask, loss_weight=50.0)
    want = 50.0 * electra_formula(z, corrupted, original, mask)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    assert abs(got.double().item() - want.item()) <= tol * abs(want.item())


def test_rtd_reductions_empty_mask_and_stats():
    corrupted, original, mask = rtd_batch()
    z = torch.randn(corrupted.shape, dtype=torch.float64)
    none = rtd_loss(z, corrupted, original, mask, reduction="none")
    assert none.shape == z.shape and (none[mask == 0] == 0).all()
    total = rtd_loss(z, corrupted, original, mask, reduction="sum")
    mean = rtd_loss(z, corrupted, original, mask)
    torch.testing.assert_close(total, none.sum())
    torch.testing.assert_close(mean, total / mask.sum())
    empty = rtd_loss(z.requires_grad_(), corrupted, original, torch.zeros_like(mask))
    assert empty.item() == 0.0
    empty.backward()
    assert (z.grad == 0).all()
    loss, stats = rtd_loss(z.detach(), corrupted, original, mask, return_stats=True)
    real = mask.bool()
    pred, lab = (z > 0)[real], (corrupted != original)[real]
    assert stats["accuracy"].item() == pytest.approx((pred == lab).float().mean().item())
    assert stats["precision"].item() == pytest.approx(((pred & lab).sum() / pred.sum()).item())
    assert stats["recall"].item() == pytest.approx(((pred & lab).sum() / lab.sum()).item())
    assert stats["replaced"].item() == lab.sum().item() and stats["tokens"].item() == real.sum().item()


def test_rtd_gradcheck_fused_head():
    corrupted, original, mask = rtd_batch(B=2, L=5)
    hidden = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn((), dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda h, w, b: rtd_loss(h, corrupted, original, mask, head_weight=w, head_bias=b,
                                                      loss_weight=2.0), (hidden, w, b))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("N,E,V", [(1, 24, 11), (53, 24, 997), (7, 128, 30522)], ids=["N1-E24-V11", "N53-E24-V997",
                                                                                       "N7-E128-V30522"])
def test_linear_cross_entropy_matches_torch(reduction, N, E, V):
    hidden = torch.randn(N, E, dtype=torch.float64)
    weight = torch.randn(V, E, dtype=torch.float64) / E**0.5
    bias = torch.randn(V, dtype=torch.float64)
    targets = torch.randint(0, V, (N,))
    targets[::3] = -100
    got = linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction)
    want = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets, reduction=reduction)
    if reduction == "mean" and (targets == -100).all():
        want = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_linear_cross_entropy_all_ignored_is_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8)
    loss = linear_cross_entropy(hidden, weight, torch.full((4,), -100))
    assert loss.item() == 0.0
    loss.backward()
    assert (hidden.grad == 0).all()


def test_linear_cross_entropy_gradcheck():
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 12, -100, 5, 7])
    torch.autograd.gradcheck(lambda h, w, b: linear_cross_entropy(h, w, targets, b), (hidden, weight, bias))


def test_sampling_chi_square_against_softmax():
    """Many rows with identical logits: sample counts fit softmax(z / T) (chi-square, p > 1e-4)."""
    V, N, T = 7, 20000, 0.7
    weight = torch.randn(V, 3, dtype=torch.float64)
    hidden = torch.randn(1, 3, dtype=torch.float64).expand(N, 3)
    _, sampled = linear_cross_entropy(hidden, weight, torch.zeros(N, dtype=torch.long), sample=True,
                                      temperature=T, seed=11)
    probs = torch.softmax((hidden[0] @ weight.t()) / T, 0)
    observed = torch.bincount(sampled, minlength=V).double()
    expected = probs * N
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    # 6 degrees of freedom: P(chi2 > 33.1) = 1e-5
    assert chi2 < 33.1, (chi2, observed, expected)


def test_sampling_reproducible_disallow_and_tile_independent():
    N, E, V = 40, 8, 101
    hidden, weight = torch.randn(N, E), torch.randn(V, E)
    targets = torch.randint(0, V, (N,))
    _, a = linear_cross_entropy(hidden, weight, targets, sample=True, seed=3)
    _, b = linear_cross_entropy(hidden, weight, targets, sample=True, seed=3)
    _, c = linear_cross_entropy(hidden, weight, targets, sample=True, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the noise of row n depends on (seed, n, v) only: a subset of rows draws the same ids
    _, sub = linear_cross_entropy(hidden[:10], weight, targets[:10], sample=True, seed=3)
    assert torch.equal(sub, a[:10])
    _, d = linear_cross_entropy(hidden, weight, targets, sample=True, seed=3, disallow=a)
    assert (d != a).all()
    # temperature changes sampling only
    la = linear_cross_entropy(hidden, weight, targets, sample=True, seed=3, temperature=0.1)[0]
    lb = linear_cross_entropy(hidden, weight, targets)
    torch.testing.assert_close(la, lb)


def test_gumbel_noise_is_standard_gumbel():
    g = reference.gumbel_noise(9, torch.arange(200), 500).double()
    assert abs(g.mean().item() - 0.5772156649) < 0.02  # Euler-Mascheroni
    assert abs(g.var().item() - math.pi**2 / 6) < 0.05
