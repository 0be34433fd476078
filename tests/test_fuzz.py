"""Property-based fuzzing (hypothesis) of every fused backend against the float64 reference.

Strategies draw shapes (1, primes, memory, cross-attention key lengths), layouts (contiguous,
time-major transposed views, views with a stride-2 last dimension), dtypes (float32, bfloat16,
float16) and the options of each op; every output and every gradient must pass the spec's
tolerance policy (conftest.assert_policy: float64 oracle on the inputs as rounded to the tested dtype,
same-dtype reference). Samples must equal the reference's ids, or be a tie within rounding under the
float64 oracle.

Profiles (``PYOBJECTIVES_FUZZ``):

* unset / ``quick`` (``make test``): a few derandomized examples per op and backend, tiny sizes.
* ``long``: 500 random examples per op and backend (larger sizes on ``cpu``); run it with
  ``PYOBJECTIVES_FUZZ=long pytest tests/test_fuzz.py -s``. It does not stop at the first policy miss:
  it runs every example, prints each miss (with the candidate's error in ulps of the largest oracle
  value, which tells a rounding-level miss from a defect) and fails at the end if there was any.
"""

import os

import pytest
import torch
from conftest import assert_policy, backend_device, fused_backend_params, max_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyobjectives import linear_cross_entropy, reference, rtd_loss, two_stream_attention
from pyobjectives.reference.electra import gumbel_noise

PROFILE = os.environ.get("PYOBJECTIVES_FUZZ", "quick")
if PROFILE not in ("quick", "long"):
    raise ValueError(f"PYOBJECTIVES_FUZZ must be 'quick' or 'long', got {PROFILE!r}")
LONG = PROFILE == "long"

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

FUZZ = settings(max_examples=500 if LONG else 4, derandomize=not LONG, deadline=None, database=None,
                print_blob=True, suppress_health_check=list(HealthCheck))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("contiguous", "time-major", "sliced")


def sizes(backend):
    """Lengths to draw from: 1 and primes; the Triton interpreter pays per program, so it stays small."""
    if LONG and backend == "cpu":
        return [1, 2, 3, 5, 7, 11, 13, 17, 23, 31, 37]
    return [1, 2, 3, 5, 7, 11, 13]


def laid_out(t, layout):
    """A differentiable view of ``t`` with the given strides (the leaf keeps its own layout)."""
    if layout == "time-major" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if layout == "sliced":
        return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]
    return t


def policy_run(fn, leaves, fixed, dtype, layouts, device, weight_dtype=None, **kw):
    """Outputs and leaf gradients of ``fn``; floating leaves cast to ``dtype`` and passed in their layout.
    The backward projects the outputs on fixed random weights, rounded to ``weight_dtype`` (default: the
    output's dtype) so that the oracle can see the same weights as the run it judges."""
    xs = {n: t.detach().to(device, dtype).requires_grad_() for n, t in leaves.items()}
    args = {n: laid_out(x, layouts.get(n, "contiguous")) for n, x in xs.items()}
    fixed = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in fixed.items()}
    out = fn(**args, **fixed, **kw)
    outs = out if isinstance(out, tuple) else (out,)
    diff = [o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.numel()]
    gen = torch.Generator().manual_seed(5)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(weight_dtype or o.dtype).to(device, o.dtype)
               for o in diff]
    if diff:
        torch.autograd.backward([(o * w).sum() for o, w in zip(diff, weights)])
    grads = {n: (x.grad if x.grad is not None else torch.zeros_like(x)) for n, x in xs.items()}
    return outs, grads


ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def policy(name, candidate, same_dtype_ref, oracle, dtype):
    """assert_policy, with the candidate's error in ulps of the largest oracle value on a miss."""
    try:
        assert_policy(name, candidate, same_dtype_ref, oracle, dtype)
    except AssertionError as miss:
        top = oracle.abs().max().item() if oracle.numel() else 0.0
        ulp = ULP[dtype] * 2.0 ** torch.tensor(max(top, 1e-30)).log2().floor().item()
        raise AssertionError(f"{str(miss).splitlines()[0]} [{max_err(candidate, oracle) / ulp:.2f} ulp of "
                             f"max |oracle| = {top:.3g}, {oracle.numel()} elements]") from None


def run_example(body, case, passed, misses):
    """One example: quick mode raises at once (hypothesis shrinks it); long mode records misses."""
    try:
        body(case)
    except AssertionError as miss:
        if not LONG:
            raise
        misses.append(f"{str(miss).splitlines()[0]}\n    case: {describe(case)}")
        print(f"\nMISS {misses[-1]}")
    passed.append(1)


def describe(case):
    """Shapes, strides and options of a case (the tensors' values come from its seed)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{v.dtype}{list(v.shape)}".replace("torch.", "")
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {one(x)}" for k, x in v.items()) + "}"
        return repr(v).replace("torch.", "")
    return ", ".join(one(part) for part in case)


def finish(op, backend, passed, misses):
    print(f"\n{op} on {backend}: {len(passed)} examples, {len(misses)} policy misses")
    assert not misses, f"{len(misses)} of {len(passed)} examples missed the policy:\n" + "\n".join(misses)


def check(backend, fn, leaves, fixed, dtype, layouts, names, **kw):
    device = backend_device(backend)
    got, got_g = policy_run(fn, leaves, fixed, dtype, layouts, device, backend=backend, **kw)
    ref, ref_g = policy_run(fn, leaves, fixed, dtype, {}, device, backend="reference", **kw)
    # the spec's oracle: float64 on the same inputs, i.e. the values the runs see after rounding to dtype
    # (the float64 draws themselves would charge every run the input quantization, a noise that the
    # 2x rule then compares between runs)
    exact = {n: t.to(dtype).double() for n, t in leaves.items()}
    orc, orc_g = policy_run(fn, exact, fixed, torch.float64, {}, device, weight_dtype=dtype, backend="reference",
                            **kw)
    for name, a, b, c in zip(names, got, ref, orc):
        if name is not None and a is not None:
            assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
            policy(name, a, b, c, dtype)
    for n in leaves:
        policy(f"grad {n}", got_g[n], ref_g[n], orc_g[n], dtype)
    return got, orc


def floats(gen, *shape, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


# --- two-stream attention ---------------------------------------------------------------------------

@st.composite
def attention_cases(draw, backend):
    L = sizes(backend)
    B, H = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3]))
    D = draw(st.sampled_from([1, 3, 8, 16]))
    Lq = draw(st.sampled_from(L))
    use_r, causal, sees_self = draw(st.booleans()), draw(st.booleans()), draw(st.booleans())
    t5 = draw(st.sampled_from([None, "bidirectional", "unidirectional"]))
    positional = use_r or causal or sees_self or t5 is not None
    M = draw(st.sampled_from([0, 1, 3, 7]))
    Lk = M + Lq if positional or draw(st.booleans()) else draw(st.sampled_from(L))  # cross-attention: any Lk
    M = Lk - Lq
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    leaves = dict(q=floats(gen, B, Lq, H, D), k=floats(gen, B, Lk, H, D), v=floats(gen, B, Lk, H, D))
    fixed = dict(causal=causal, content_sees_self=sees_self)
    if use_r:
        R = Lk + draw(st.sampled_from([1, Lq, Lq + 3]))
        leaves.update(r=floats(gen, *((B,) if draw(st.booleans()) else ()), R, H, D),
                      r_w_bias=floats(gen, H, D), r_r_bias=floats(gen, H, D))
    elif draw(st.booleans()):
        leaves["r_w_bias"] = floats(gen, H, D)
    if draw(st.booleans()):
        P = draw(st.integers(0, Lq + 2))
        leaves["q_g"] = floats(gen, B, P, H, D)
        fixed["target_pos"] = torch.randint(-1, Lq, (B, P), generator=gen)
    masks = draw(st.sets(st.sampled_from(["rank", "dense", "padding"])))
    if "rank" in masks:
        fixed["q_rank"] = torch.randint(0, Lq + 1, (B, Lq), generator=gen, dtype=torch.int32)
        fixed["k_rank"] = torch.randint(-1, Lq + 1, (B, Lk), generator=gen, dtype=torch.int32)
    if "dense" in masks:
        fixed["attn_mask"] = torch.rand(B, Lq, Lk, generator=gen) < 0.3
    if "padding" in masks:
        fixed["key_padding_mask"] = torch.rand(B, Lk, generator=gen) < 0.3
    segments = draw(st.sampled_from([None, "ids", "dense"]))
    if segments is not None:
        if segments == "ids":
            fixed.update(seg_q=torch.randint(0, 3, (B, Lq), generator=gen),
                         seg_k=torch.randint(0, 3, (B, Lk), generator=gen))
        else:
            fixed["seg_diff"] = torch.rand(B, Lq, Lk, generator=gen) < 0.5
        leaves.update(r_s_bias=floats(gen, H, D), seg_embed=floats(gen, 2, H, D))
    if t5 is not None:
        leaves["t5_bias"] = floats(gen, 8, H)
        fixed.update(t5_num_buckets=8, t5_max_distance=draw(st.sampled_from([5, 9, 40])),
                     t5_bidirectional=t5 == "bidirectional")
    dropout = draw(st.sampled_from([0.0, 0.0, 0.2, 0.5]))
    if dropout:
        fixed.update(dropout_p=dropout, seed=draw(st.integers(0, 2**62)))
    fixed["empty_rows"] = draw(st.sampled_from(["zero", "uniform"]))
    if draw(st.booleans()):
        fixed["scale"] = draw(st.sampled_from([1.0, 0.05]))
    layouts = {n: draw(st.sampled_from(LAYOUTS)) for n in ("q", "k", "v", "q_g", "r") if n in leaves}
    return leaves, fixed, draw(st.sampled_from(DTYPES)), layouts


@pytest.mark.parametrize("backend", fused_backend_params())
def test_fuzz_two_stream_attention(backend):
    passed, misses = [], []

    def body(case):
        leaves, fixed, dtype, layouts = case
        check(backend, two_stream_attention, leaves, fixed, dtype, layouts, ("out_h", "out_g"))

    FUZZ(given(case=attention_cases(backend))(lambda case: run_example(body, case, passed, misses)))()
    finish("two_stream_attention", backend, passed, misses)


# --- RTD loss ----------------------------------------------------------------------------------------

@st.composite
def rtd_cases(draw, backend):
    L = sizes(backend)
    lead = tuple(draw(st.lists(st.sampled_from(L), min_size=1, max_size=2)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    head = draw(st.booleans())
    scale = 1.0
    if head:
        Dd = draw(st.sampled_from([1, 3, 8, 17]))
        leaves = dict(logits_or_hidden=floats(gen, *lead, Dd), head_weight=floats(gen, Dd, scale=3 / Dd**0.5))
        if draw(st.booleans()):
            leaves["head_bias"] = floats(gen)
    else:
        scale = draw(st.sampled_from([1.0, 4.0, 30.0]))
        leaves = dict(logits_or_hidden=floats(gen, *lead, scale=scale))
    original = torch.randint(0, 20, lead, generator=gen)
    corrupted = torch.where(torch.rand(lead, generator=gen) < 0.3, torch.randint(0, 20, lead, generator=gen),
                            original)
    fixed = dict(corrupted_ids=corrupted, original_ids=original)
    mask = draw(st.sampled_from([None, torch.bool, torch.int64, torch.float32]))
    if mask is not None:
        fixed["attention_mask"] = (torch.rand(lead, generator=gen) >= 0.25).to(mask)
    kw = dict(reduction=draw(st.sampled_from(["mean", "sum", "none"])),
              loss_weight=draw(st.sampled_from([1.0, 50.0])), return_stats=draw(st.booleans()))
    layouts = {"logits_or_hidden": draw(st.sampled_from(LAYOUTS))}
    dtype = draw(st.sampled_from(DTYPES))
    if dtype == torch.float16 and kw["reduction"] == "sum":
        # a float16 sum of 1000 tokens' losses (times 50) can exceed 65504: keep the exact result representable
        kw["loss_weight"] = 1.0
        leaves["logits_or_hidden"] = leaves["logits_or_hidden"] / scale
    return leaves, fixed, kw, dtype, layouts


@pytest.mark.parametrize("backend", fused_backend_params("rtd_loss"))
def test_fuzz_rtd_loss(backend):
    passed, misses = [], []

    def body(case):
        leaves, fixed, kw, dtype, layouts = case
        got, orc = check(backend, rtd_loss, leaves, fixed, dtype, layouts, ("loss", None), **kw)
        if kw["return_stats"] and dtype == torch.float32:
            # statistics count signs of z; in half precision a logit within rounding of 0 may flip
            want = rtd_loss(**leaves, **fixed, **kw, backend="reference")[1]
            for name, value in got[1].items():
                assert value.item() == pytest.approx(want[name].item(), rel=1e-6), name

    FUZZ(given(case=rtd_cases(backend))(lambda case: run_example(body, case, passed, misses)))()
    finish("rtd_loss", backend, passed, misses)


# --- linear + cross-entropy ------------------------------------------------------------------------

@st.composite
def lce_cases(draw, backend):
    L = sizes(backend)
    N, E = draw(st.sampled_from(L)), draw(st.sampled_from([1, 3, 8, 17]))
    V = draw(st.sampled_from([1, 2, 7, 31, 67]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    leaves = dict(hidden=floats(gen, N, E), weight=floats(gen, V, E, scale=2 / E**0.5))
    if draw(st.booleans()):
        leaves["bias"] = floats(gen, V)
    ignore_index = draw(st.sampled_from([-100, -1]))
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore_index
    fixed = dict(targets=targets)
    kw = dict(ignore_index=ignore_index, reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    if draw(st.booleans()):
        kw.update(sample=True, temperature=draw(st.sampled_from([0.5, 1.0, 3.0])), seed=draw(st.integers(0, 2**62)))
        if draw(st.booleans()):
            kw["disallow"] = torch.randint(-1, V, (N,), generator=gen)
    layouts = {n: draw(st.sampled_from(LAYOUTS)) for n in ("hidden", "weight")}
    return leaves, fixed, kw, draw(st.sampled_from(DTYPES)), layouts


def assert_samples_match(got, want, leaves, dtype, kw, orc_logits):
    """Equal ids, or ids whose scores under the float64 oracle tie within the logits' rounding."""
    differ = got != want
    if not differ.any():
        return
    N, V = orc_logits.shape
    score = orc_logits / kw["temperature"] + gumbel_noise(kw["seed"], torch.arange(N), V).double()
    rows = differ.nonzero()[:, 0]
    gap = (score[rows, want[rows]] - score[rows, got[rows]]).abs()
    eps = {torch.float32: 2**-23, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    tol = 8 * eps * (orc_logits[rows].abs().amax(1) + 1) / kw["temperature"]
    assert (gap <= tol).all(), f"samples differ at rows {rows.tolist()}: score gaps {gap.tolist()} > {tol.tolist()}"


@pytest.mark.parametrize("backend", fused_backend_params("linear_cross_entropy"))
def test_fuzz_linear_cross_entropy(backend):
    passed, misses = [], []

    def body(case):
        leaves, fixed, kw, dtype, layouts = case
        got, _ = check(backend, linear_cross_entropy, leaves, fixed, dtype, layouts, ("loss", None), **kw)
        if kw.get("sample"):
            want = linear_cross_entropy(**{n: t.to(dtype) for n, t in leaves.items()}, **fixed, **kw,
                                        backend="reference")[1]
            logits = leaves["hidden"] @ leaves["weight"].t() + leaves.get("bias", 0)
            if "disallow" in kw:
                banned = torch.arange(logits.shape[1])[None, :] == kw["disallow"][:, None]
                logits = logits.masked_fill(banned, float("-inf"))
            assert_samples_match(got[1].cpu(), want.cpu(), leaves, dtype, kw, logits)

    FUZZ(given(case=lce_cases(backend))(lambda case: run_example(body, case, passed, misses)))()
    finish("linear_cross_entropy", backend, passed, misses)
