"""Determinism and reproducibility (docs/backends.md, "Determinism"): a seed gives bitwise the same
dropout masks and Gumbel samples on every backend, whatever the tile sizes and thread counts; a fixed
configuration gives bitwise the same outputs and gradients run after run; every op runs forward and
backward under ``torch.use_deterministic_algorithms(True)``.
"""

import pytest
import torch
from attention_inputs import make_inputs
from conftest import backend_device, backend_reasons, fused_backend_params
from test_electra_backends import lce_inputs, rtd_inputs

from pyobjectives import linear_cross_entropy, reference, rtd_loss, two_stream_attention
from pyobjectives.reference.philox import philox_uniform

ALL = [pytest.param("reference", id="reference")] + fused_backend_params()
#: Triton tile configurations: (BM = content rows and query-chunk position block, BQ = query-chunk rows,
#: BN = key tile). The interpreter's default is (16, 16, 16).
TRITON_TILES = [(16, 16, 16), (32, 32, 32), (32, 16, 16)]


@pytest.fixture
def threads():
    """Set torch's intra-op thread count inside a test; restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def triton_tiles(monkeypatch):
    """Switch the Triton attention kernels to a tile configuration (BM, BQ, BN)."""
    def use(BM, BQ, BN):
        import triton

        from pyobjectives.kernels import two_stream_attention as A
        monkeypatch.setattr(A, "_row_blocks", lambda: dict(BM=BM, BQ=BQ))
        for kernel in (A._fwd_kernel, A._dq_kernel, A._dkdv_kernel):
            monkeypatch.setattr(kernel, "configs", [triton.Config({"BN": BN}, num_warps=1, num_stages=1)])
            monkeypatch.setattr(kernel, "cache", {})
    return use


def attention_configs(backend):
    """(id, setup) pairs: every tiling / thread count a backend offers here."""
    if backend == "cpu":
        return [(f"threads{n}", dict(threads=n)) for n in (1, 2)]
    if backend == "triton":
        return [(f"BM{bm}-BQ{bq}-BN{bn}", dict(tiles=(bm, bq, bn))) for bm, bq, bn in TRITON_TILES]
    return [("reference", {})]


def configure(setup, threads, triton_tiles):
    if "threads" in setup:
        threads(setup["threads"])
    if "tiles" in setup:
        triton_tiles(*setup["tiles"])


def mask_inputs(device):
    """v = identity, so out[b, i, h, j] = p_ij * keep_ij / (1 - p) and (out != 0) is the dropout mask."""
    B, Lq, M, H, P = 2, 11, 3, 2, 6
    Lk = M + Lq
    x, kw = make_inputs(B=B, Lq=Lq, M=M, H=H, D=Lk, P=P, dtype=torch.float32, features=("query",))
    x["v"] = torch.eye(Lk)[None, :, None, :].expand(B, Lk, H, Lk).contiguous()
    x = {n: t.to(device) for n, t in x.items()}
    kw = {n: t.to(device) for n, t in kw.items()}
    return x, kw, (B, Lq, Lk, H, P)


def philox_masks(seed, p, B, Lq, Lk, H, P):
    """The spec's masks ([B, rows, H, Lk], like the outputs with v = identity) from the documented offsets."""
    content = philox_uniform(seed, torch.arange(B * H * Lq * Lk).view(B, H, Lq, Lk)) >= p
    query = philox_uniform(seed, B * H * Lq * Lk + torch.arange(B * H * P * Lk).view(B, H, P, Lk)) >= p
    return content.permute(0, 2, 1, 3), query.permute(0, 2, 1, 3)


@pytest.mark.parametrize("backend", ALL)
def test_attention_dropout_masks_identical_everywhere(backend, threads, triton_tiles):
    """Same seed: bitwise the same masks on every backend, tiling and thread count, run after run."""
    seed, p = 2**41 + 3, 0.4
    x, kw, dims = mask_inputs(backend_device(backend))
    want_h, want_g = philox_masks(seed, p, *dims)
    valid = (kw["target_pos"] >= 0).cpu()[:, :, None, None]
    for _, setup in attention_configs(backend):
        configure(setup, threads, triton_tiles)
        runs = [two_stream_attention(**x, **kw, dropout_p=p, seed=seed, backend=backend) for _ in range(2)]
        for out_h, out_g in runs:
            assert torch.equal(out_h.cpu() != 0, want_h), f"content-stream mask differs ({setup})"
            assert torch.equal(out_g.cpu() != 0, want_g & valid), f"query-stream mask differs ({setup})"
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    other = two_stream_attention(**x, **kw, dropout_p=p, seed=seed + 1, backend=backend)
    assert not torch.equal(other[0].cpu() != 0, want_h), "another seed must give another mask"


@pytest.mark.parametrize("backend", [p for p in fused_backend_params("linear_cross_entropy")])
def test_gumbel_samples_identical_everywhere(backend, threads, monkeypatch):
    """Same seed: the reference's sampled ids on every backend, vocabulary tiling / split and thread count."""
    leaves, fixed = lce_inputs(19, 8, 173)
    h, w, b = (leaves[n].float() for n in ("hidden", "weight", "bias"))
    args = dict(hidden=h, weight=w, targets=fixed["targets"], bias=b, sample=True, seed=2**50 + 9, temperature=0.7)
    want = linear_cross_entropy(**args, backend="reference")[1]
    if backend == "cpu":
        setups = [lambda n=n: threads(n) for n in (1, 2)]
    else:
        from pyobjectives.kernels import linear_cross_entropy as K
        setups = [lambda o=o: monkeypatch.setattr(K, "CONFIG_OVERRIDE", o)
                  for o in ({}, dict(fwd=(4, 32, 32)), dict(fwd=(16, 64, 32), fwd_splits=3), dict(fwd=(8, 256, 16)))]
    for setup in setups:
        setup()
        for _ in range(2):
            assert torch.equal(linear_cross_entropy(**args, backend=backend)[1], want)


def attention_grads(backend, x, kw, **extra):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in {**x, **kw}.items()
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    out = two_stream_attention(**{**x, **kw, **leaves}, **extra, backend=backend)
    gen = torch.Generator().manual_seed(1)
    torch.autograd.backward([(o * torch.randn(o.shape, generator=gen).to(o)).sum() for o in out])
    return [o.detach() for o in out] + [leaves[n].grad for n in sorted(leaves)]


def electra_grads(fn, backend, leaves, fixed, **kw):
    xs = {n: t.detach().float().clone().requires_grad_() for n, t in leaves.items()}
    out = fn(**xs, **fixed, **kw, backend=backend)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * torch.linspace(-1, 1, loss.numel()).view_as(loss)).sum().backward()
    return [o.detach() for o in (out if isinstance(out, tuple) else (out,))] + [xs[n].grad for n in sorted(xs)]


def bitwise_equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def all_ops(backend):
    device = backend_device(backend)
    x, kw = make_inputs(B=2, Lq=9, M=2, H=2, D=8, P=3, dtype=torch.float32,
                        features=("query", "rank", "seg_ids", "t5"))
    x, kw = ({n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in d.items()} for d in (x, kw))
    rtd_leaves, rtd_fixed = rtd_inputs((3, 37), 24)
    lce_leaves, lce_fixed = lce_inputs(11, 8, 37)
    return {
        "attention": lambda: attention_grads(backend, x, kw, dropout_p=0.2, seed=4),
        "rtd_loss": lambda: electra_grads(rtd_loss, backend, rtd_leaves, rtd_fixed),
        "rtd_loss-none": lambda: electra_grads(rtd_loss, backend, rtd_leaves, rtd_fixed, reduction="none"),
        "linear_cross_entropy": lambda: electra_grads(linear_cross_entropy, backend, lce_leaves, lce_fixed,
                                                      sample=True, seed=3),
        "linear_cross_entropy-none": lambda: electra_grads(linear_cross_entropy, backend, lce_leaves, lce_fixed,
                                                           reduction="none"),
    }


@pytest.mark.parametrize("backend", ALL)
def test_outputs_and_gradients_bitwise_reproducible(backend, threads):
    """A fixed configuration (backend, tiling, thread count) repeats itself bit for bit."""
    for n_threads in ((1, 2) if backend != "triton" else (1,)):
        threads(n_threads)
        for name, run in all_ops(backend).items():
            assert bitwise_equal(run(), run()), f"{name} differs between two runs ({n_threads} threads)"


def test_cpu_gradients_do_not_depend_on_the_thread_count(threads):
    """The documented cpu guarantee: attention and RTD sums run in a fixed order whatever the threads."""
    if backend_reasons("cpu"):
        pytest.skip("cpu backend unavailable: " + "; ".join(backend_reasons("cpu")))
    ops = all_ops("cpu")
    for name in ("attention", "rtd_loss", "rtd_loss-none"):
        threads(1)
        one = ops[name]()
        threads(2)
        assert bitwise_equal(one, ops[name]()), f"{name}: 1 and 2 threads differ"


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("backend", ALL)
def test_every_op_under_use_deterministic_algorithms(backend, deterministic_algorithms):
    """No op raises under torch.use_deterministic_algorithms(True) (which also fills new memory with NaN),
    and the results are the ones of the default mode."""
    for name, run in all_ops(backend).items():
        got = run()
        torch.use_deterministic_algorithms(False)
        want = run()
        torch.use_deterministic_algorithms(True)
        assert bitwise_equal(got, want), f"{name}: deterministic mode changes the result"
        assert all(torch.isfinite(t.float()).all() for t in got if t.is_floating_point()), name


@pytest.mark.parametrize("backend", ALL)
def test_seed_tensor_equals_its_int(backend):
    """A seed given as a one-element integer CPU tensor (what draw_seed returns under torch.compile) draws
    the same dropout masks and samples as the same int, on every backend."""
    dev = backend_device(backend)
    x, kw = make_inputs(B=2, Lq=9, M=3, H=2, D=8, P=4, dtype=torch.float32, features=("query", "rank"))
    x, kw = ({n: (t.to(dev) if isinstance(t, torch.Tensor) else t) for n, t in d.items()} for d in (x, kw))
    for seed in (5, 2**40 + 3):
        want = two_stream_attention(**x, **kw, dropout_p=0.3, seed=seed, backend=backend)
        got = two_stream_attention(**x, **kw, dropout_p=0.3, seed=torch.tensor(seed, dtype=torch.int32)
                                   if seed < 2**31 else torch.tensor(seed), backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        leaves, fixed = lce_inputs(13, 8, 41)
        args = dict(hidden=leaves["hidden"].float().to(dev), weight=leaves["weight"].float().to(dev),
                    targets=fixed["targets"].to(dev),
                    sample=True, backend=backend)
        assert torch.equal(linear_cross_entropy(**args, seed=torch.tensor(seed))[1],
                           linear_cross_entropy(**args, seed=seed)[1])
