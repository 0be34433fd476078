"""The compiled extension as torch ops: opcheck (schema, fake, autograd), torch.compile without graph
breaks, bitwise determinism, the shared header functions, and the C++ boundary's named checks."""

import math

import pytest
import torch
from attention_inputs import make_inputs
from conftest import backend_reasons

from pyobjectives import linear_cross_entropy, rtd_loss, two_stream_attention
from pyobjectives.reference.attention import t5_relative_bucket
from pyobjectives.reference.philox import philox_uniform

pytestmark = pytest.mark.skipif(bool(backend_reasons("cpu")), reason="; ".join(backend_reasons("cpu")))

ATTN_FEATURES = ("query", "rank", "padding", "seg_ids", "t5")


def attention_args(x, kw, dropout_p=0.0, seed=None, empty_uniform=False):
    """Positional arguments of two_stream_attention_fwd, in schema order (the seed as the ops take it)."""
    g = lambda n, default=None: kw.get(n, default)  # noqa: E731
    D = x["q"].shape[-1]
    return (x["q"], x["k"], x["v"], x.get("r"), x.get("r_w_bias"), x.get("r_r_bias"), g("q_g"), g("target_pos"), g("q_rank"),
            g("k_rank"), g("attn_mask"), g("key_padding_mask"), bool(g("causal", False)), g("seg_q"), g("seg_k"),
            g("seg_diff"), g("r_s_bias"), g("seg_embed"), g("t5_bias"), g("t5_num_buckets", 32),
            g("t5_max_distance", 128), bool(g("t5_bidirectional", True)), bool(g("content_sees_self", True)),
            1.0 / math.sqrt(D), dropout_p, None if seed is None else torch.tensor(seed), empty_uniform)


def float_leaves(x, kw, dtype=torch.float32):
    x = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
    kw = {n: (t.to(dtype).requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
          for n, t in kw.items()}
    return x, kw


def rtd_op_args(lead, D, head, device="cpu"):
    """``(x, head_weight, head_bias, corrupted, original, mask)`` for the rtd_loss ops (float32 leaves)."""
    x = (torch.randn(*lead, D, device=device) if head else torch.randn(*lead, device=device)).requires_grad_()
    w = torch.randn(D, device=device, requires_grad=True) if head else None
    b = torch.randn((), device=device, requires_grad=True) if head else None
    orig = torch.randint(0, 9, lead, device=device)
    corr = torch.where(torch.rand(lead, device=device) < 0.4, torch.randint(0, 9, lead, device=device), orig)
    return x, w, b, corr, orig, torch.rand(lead, device=device) > 0.2


def lce_op_args(N, E, V, ignore_every, device="cpu"):
    """``(hidden, weight, bias, targets)`` for the linear_cross_entropy ops; every ignore_every-th target -100."""
    h = torch.randn(N, E, device=device, requires_grad=True)
    w = torch.randn(V, E, device=device, requires_grad=True)
    b = torch.randn(V, device=device, requires_grad=True)
    t = torch.randint(0, V, (N,), device=device)
    t[::ignore_every] = -100
    return h, w, b, t


@pytest.mark.parametrize("features,dropout_p", [
    pytest.param(ATTN_FEATURES, 0.0, id="all-features"),
    pytest.param(("query", "dense", "seg_dense", "causal"), 0.2, id="dense-causal-dropout"),
    pytest.param((), 0.0, id="content-only"),
    pytest.param(("padding", "t5", "no_r"), 0.0, id="t5-no-r"),
    pytest.param(("padding", "no_r", "cross"), 0.2, id="cross-attention-dropout"),
])
def test_opcheck_attention(features, dropout_p):
    x, kw = make_inputs(B=2, Lq=9, M=3, H=2, D=8, P=4, features=features)
    if "no_r" in features:  # T5 / plain attention: no position term, masks as given
        del x["r"], x["r_r_bias"]
        kw["content_sees_self"] = False
    if "cross" in features:  # keys shorter than the queries
        x["k"], x["v"], kw["key_padding_mask"] = x["k"][:, :5], x["v"][:, :5], kw["key_padding_mask"][:, :5]
    x, kw = float_leaves(x, kw)
    torch.library.opcheck(torch.ops.pyobjectives.two_stream_attention_fwd,
                          attention_args(x, kw, dropout_p=dropout_p, seed=5))


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("head", [False, True], ids=["logits", "head"])
def test_opcheck_rtd(head, reduction):
    lead, D = (3, 7), 5
    x, w, b, corr, orig, mask = rtd_op_args(lead, D, head)
    torch.library.opcheck(torch.ops.pyobjectives.rtd_loss_fwd, (x, w, b, corr, orig, mask, 2.0, reduction, True, head))
    torch.library.opcheck(torch.ops.pyobjectives.rtd_loss_head_bwd,
                          (torch.randn(21), torch.randn(1), torch.randn(D), torch.randn(*lead, D)))


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_opcheck_linear_cross_entropy(reduction):
    N = 11
    h, w, b, t = lce_op_args(N, 6, 23, ignore_every=4)
    torch.library.opcheck(torch.ops.pyobjectives.linear_cross_entropy_fwd,
                          (h, w, b, t, -100, reduction, True, 0.7, torch.tensor(3), None, True, reduction != 0))
    torch.library.opcheck(torch.ops.pyobjectives.linear_cross_entropy_bwd, (h, w, b, t, -100, torch.randn(N)))


CUDA_REASONS = backend_reasons("cuda", "rtd_loss")
requires_cuda = pytest.mark.skipif(bool(CUDA_REASONS), reason="cuda backend unavailable: " + "; ".join(CUDA_REASONS))


@requires_cuda
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
@pytest.mark.parametrize("head", [False, True], ids=["logits", "head"])
def test_opcheck_rtd_cuda(head, reduction):
    lead, D = (3, 37), 24
    dev = "cuda"
    x, w, b, corr, orig, mask = rtd_op_args(lead, D, head, device=dev)
    torch.library.opcheck(torch.ops.pyobjectives.rtd_loss_fwd, (x, w, b, corr, orig, mask, 2.0, reduction, True, head))
    torch.library.opcheck(torch.ops.pyobjectives.rtd_loss_head_bwd,
                          (torch.randn(111, device=dev), torch.randn(1, device=dev), torch.randn(D, device=dev),
                           torch.randn(*lead, D, device=dev)))


@requires_cuda
@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_opcheck_linear_cross_entropy_cuda(reduction):
    N, dev = 11, "cuda"
    h, w, b, t = lce_op_args(N, 16, 523, ignore_every=4, device=dev)
    torch.library.opcheck(torch.ops.pyobjectives.linear_cross_entropy_fwd,
                          (h, w, b, t, -100, reduction, True, 0.7, torch.tensor(3), None, True, reduction != 0))
    torch.library.opcheck(torch.ops.pyobjectives.linear_cross_entropy_bwd,
                          (h, w, b, t, -100, torch.randn(N, device=dev)))


CUDA_ATTN_REASONS = backend_reasons("cuda", "two_stream_attention")


@pytest.mark.skipif(bool(CUDA_ATTN_REASONS), reason="cuda attention unavailable: " + "; ".join(CUDA_ATTN_REASONS))
@pytest.mark.parametrize("features,dropout_p", [
    pytest.param(ATTN_FEATURES, 0.0, id="all-features"),
    pytest.param(("query", "dense", "seg_dense", "causal"), 0.2, id="dense-causal-dropout"),
])
def test_opcheck_attention_cuda(features, dropout_p):
    x, kw = make_inputs(B=2, Lq=70, M=6, H=2, D=64, P=9, features=features)
    x = {n: t.cuda() for n, t in x.items()}
    kw = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    x, kw = float_leaves(x, kw, torch.bfloat16)
    torch.library.opcheck(torch.ops.pyobjectives.two_stream_attention_fwd,
                          attention_args(x, kw, dropout_p=dropout_p, seed=5))


def _compiled_matches_eager(fn, inputs):
    eager_out = fn(*inputs)
    eager_grads = torch.autograd.grad(eager_out, [t for t in inputs if t.requires_grad])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad])
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compile_fullgraph_attention():
    torch._dynamo.reset()
    x, kw = float_leaves(*make_inputs(B=2, Lq=9, M=3, H=2, D=8, P=4, features=ATTN_FEATURES))
    names = list(x) + [n for n, t in kw.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    rest = {n: t for n, t in kw.items() if n not in names}

    def fn(*leaves):
        out_h, out_g = two_stream_attention(**dict(zip(names, leaves)), **rest, dropout_p=0.1, seed=7, backend="cpu")
        return (out_h * out_h).sum() + out_g.sum()

    _compiled_matches_eager(fn, [x[n] if n in x else kw[n] for n in names])


def test_compile_fullgraph_electra_ops():
    torch._dynamo.reset()
    h = torch.randn(13, 8, requires_grad=True)
    w = torch.randn(31, 8, requires_grad=True)
    t = torch.randint(0, 31, (13,))
    hid = torch.randn(4, 6, 8, requires_grad=True)
    hw = torch.randn(8, requires_grad=True)
    orig = torch.randint(0, 9, (4, 6))
    corr = torch.where(torch.rand(4, 6) < 0.4, torch.randint(0, 9, (4, 6)), orig)

    def fn(h, w, hid, hw):
        gen, _ = linear_cross_entropy(h, w, t, sample=True, seed=3, backend="cpu")
        disc = rtd_loss(hid, corr, orig, head_weight=hw, loss_weight=50.0, backend="cpu")
        return gen + disc

    _compiled_matches_eager(fn, [h, w, hid, hw])


def _attention_grads(x, kw):
    x, kw = float_leaves(x, kw)
    out_h, out_g = two_stream_attention(**x, **kw, dropout_p=0.1, seed=11, backend="cpu")
    leaves = list(x.values()) + [t for t in kw.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    return torch.autograd.grad((out_h * out_h).sum() + out_g.sum(), leaves)


@pytest.mark.parametrize("threads", [1, 2])
def test_gradients_bitwise_deterministic(threads):
    """Every (batch, head) belongs to one thread and batch sums run in a fixed order: repeated runs give
    identical bits."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, kw = make_inputs(B=3, Lq=70, M=6, H=3, D=16, P=13, features=ATTN_FEATURES)
        first, second = _attention_grads(x, kw), _attention_grads(x, kw)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        h = torch.randn(300, 16, requires_grad=True)
        w = torch.randn(501, 16, requires_grad=True)
        t = torch.randint(0, 501, (300,))
        runs = [torch.autograd.grad(linear_cross_entropy(h, w, t, backend="cpu"), [h, w]) for _ in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(*runs))
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", [
    (True, 32, 128), (False, 32, 128), (True, 16, 20), (False, 8, 10), (True, 64, 1000), (True, 4, 3),
])
def test_header_t5_bucket_equals_reference(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-5000, 5001)
    got = torch.ops.pyobjectives.t5_bucket(rel, bidirectional, num_buckets, max_distance)
    want = t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    assert torch.equal(got, want)


def test_header_philox_equals_reference():
    offsets = torch.cat([torch.arange(4096), torch.tensor([2**32 - 1, 2**32, 2**40 + 3, 2**62 + 17])])
    for seed in (0, 1, 2**32 + 5, 2**63 - 1):
        got = torch.ops.pyobjectives.philox_uniform(seed, offsets)
        assert torch.equal(got, philox_uniform(seed, offsets))


@pytest.mark.parametrize("start,n", [(0, 4099), (2**32 - 21, 77), (2**40 + 5, 33)])
def test_vectorized_philox_runs_equal_reference(start, n):
    """The kernels' 16-lane Philox (dropout, Gumbel noise) gives the reference's bits, across a wrap of the
    low counter word too."""
    for seed in (7, 2**63 - 1):
        got = torch.ops.pyobjectives.philox_uniform_run(seed, torch.tensor(start), n)
        assert torch.equal(got, philox_uniform(seed, torch.arange(start, start + n)))


def test_rtd_head_gradients_of_no_tokens_are_zero():
    x = torch.randn(0, 5, 4, requires_grad=True)
    w, b = torch.randn(4, requires_grad=True), torch.randn((), requires_grad=True)
    ids = torch.zeros(0, 5, dtype=torch.long)
    rtd_loss(x, ids, ids, head_weight=w, head_bias=b, reduction="none", backend="cpu").sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros(4)) and b.grad.item() == 0.0


def test_cpp_checks_name_the_argument():
    x, kw = make_inputs(B=2, Lq=5, H=2, D=8, P=2, dtype=torch.float32, features=("query",))
    args = list(attention_args(x, kw))
    bad_v = list(args)
    bad_v[2] = x["v"][:, :4]
    with pytest.raises(RuntimeError, match=r"v must have shape \(B, Lk, H, D\)"):
        torch.ops.pyobjectives.two_stream_attention_fwd(*bad_v)
    short_r = list(args)
    short_r[3] = x["r"][:5]
    with pytest.raises(RuntimeError, match="r must have at least Lk \\+ 1 = 6 rows"):
        torch.ops.pyobjectives.two_stream_attention_fwd(*short_r)
    bad_tp = list(args)
    bad_tp[7] = kw["target_pos"].float()
    with pytest.raises(RuntimeError, match="target_pos must be an integer tensor"):
        torch.ops.pyobjectives.two_stream_attention_fwd(*bad_tp)
    with pytest.raises(RuntimeError, match="weight must have dtype"):
        torch.ops.pyobjectives.linear_cross_entropy_fwd(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.bfloat16),
                                                        None, torch.zeros(3, dtype=torch.long), -100, 1, False, 1.0, None,
                                                        None, False, False)
    with pytest.raises(RuntimeError, match="seed must be a one-element int64 CPU tensor"):
        torch.ops.pyobjectives.linear_cross_entropy_fwd(torch.randn(3, 4), torch.randn(5, 4), None,
                                                        torch.zeros(3, dtype=torch.long), -100, 1, True, 1.0,
                                                        torch.tensor([1.5]), None, False, False)
    with pytest.raises(RuntimeError, match="seed must be non-negative"):
        torch.ops.pyobjectives.linear_cross_entropy_fwd(torch.randn(3, 4), torch.randn(5, 4), None,
                                                        torch.zeros(3, dtype=torch.long), -100, 1, True, 1.0,
                                                        torch.tensor(-4), None, False, False)
    with pytest.raises(RuntimeError, match="corrupted_ids must have shape"):
        torch.ops.pyobjectives.rtd_loss_fwd(torch.randn(3, 4), None, None, torch.zeros(3, dtype=torch.long),
                                            torch.zeros(3, 4, dtype=torch.long), None, 1.0, 1, False, False)


def test_info_lists_cpu_available_for_every_op():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "pyobjectives", "info"], capture_output=True, text=True,
                         check=True).stdout
    assert out.count("    cpu        available") == 3, out


_AUTO_UNDER_COMPILE = r'''
import sys, torch
sys.path.insert(0, "tests")
from attention_inputs import make_inputs
import pyobjectives as po
x, kw = make_inputs(B=2, Lq=9, M=2, H=2, D=8, P=3, features=("query", "rank", "t5"), dtype=torch.float32)
f = lambda q: po.two_stream_attention(q, **{n: t for n, t in x.items() if n != "q"}, **kw)[0].sum()
print(torch.compile(f, fullgraph=True, backend="aot_eager")(x["q"]).item() == f(x["q"]).item())
'''


def test_auto_dispatch_traces_without_graph_break():
    """A user's first call may already be traced: backend="auto" resolves with no import inside the graph."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _AUTO_UNDER_COMPILE], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("True"), proc.stderr[-3000:]
