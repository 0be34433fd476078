"""Fused two-stream attention backends (triton, cpu) against the float64 reference (spec tolerance
policy): every feature, feature combination and gradient, odd sizes, dropout masks, strides.

On this CPU machine the Triton kernels run under TRITON_INTERPRET=1 (set in conftest), so sizes stay
small; on a GPU run with TRITON_INTERPRET=0 and CUDA inputs the same tests exercise the compiled kernels.
"""

import pytest
import torch

from attention_inputs import make_inputs
from conftest import DTYPE_ID, assert_policy, backend_device, backend_reasons, fused_backend_params, skip_if_refused

from pyobjectives import BackendUnavailableError, reference, two_stream_attention
from pyobjectives.reference.philox import philox_uniform

BACKENDS = fused_backend_params()
requires_triton = pytest.mark.skipif(bool(backend_reasons("triton")), reason="triton backend unavailable: "
                                     + "; ".join(backend_reasons("triton")))
GRAD_NAMES = ["q", "k", "v", "r", "r_w_bias", "r_r_bias", "q_g", "r_s_bias", "seg_embed", "t5_bias"]


def on_device(d, backend):
    device = backend_device(backend)
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in d.items()}


def run(backend, x, kw, dtype, device=None, **extra):
    """Outputs and all gradients of one call with inputs cast to ``dtype`` (fixed random output weights)."""
    device = device or backend_device(backend)
    leaves = {n: (x[n] if n in x else kw[n]).detach().to(device, dtype).requires_grad_()
              for n in GRAD_NAMES if n in x or n in kw}
    rest = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in {**x, **kw}.items()
            if n not in leaves}
    try:
        out = two_stream_attention(**leaves, **rest, **extra, backend=backend)
    except BackendUnavailableError as exc:
        if backend != "cuda":  # only cuda's limits (bf16 / fp16, D in {64, 128}) are narrower than the tests'
            raise
        skip_if_refused(backend, exc)
    outs = [o for o in out if o is not None]
    gen = torch.Generator().manual_seed(123)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device, o.dtype) for o in outs]
    torch.autograd.backward([(o * w).sum() for o, w in zip(outs, weights)])
    return outs, {n: t.grad for n, t in leaves.items()}


def check_against_reference(backend, x, kw, dtype, **extra):
    device = backend_device(backend)
    oracle_out, oracle_grads = run("reference", x, kw, torch.float64, device=device, **extra)
    ref_out, ref_grads = run("reference", x, kw, dtype, device=device, **extra)
    out, grads = run(backend, x, kw, dtype, **extra)
    for i, (o, r, w) in enumerate(zip(out, ref_out, oracle_out)):
        assert o.dtype == dtype
        assert_policy(["out_h", "out_g"][i], o, r, w, dtype)
    for name in oracle_grads:
        assert grads[name] is not None, f"no gradient for {name}"
        assert_policy(f"grad {name}", grads[name], ref_grads[name], oracle_grads[name], dtype)


FEATURES = {
    "content": (), "query": ("query",), "rank": ("query", "rank"), "dense": ("query", "dense"),
    "padding": ("query", "padding"), "causal": ("query", "causal"), "seg_ids": ("query", "seg_ids"),
    "seg_dense": ("query", "seg_dense"), "t5": ("query", "t5"), "t5_uni-causal": ("query", "t5_uni", "causal"),
    "all": ("query", "rank", "dense", "padding", "seg_ids", "t5"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_features(backend, features, dtype):
    x, kw = make_inputs(B=2, Lq=21, M=5, H=2, D=16, P=5, features=features)
    check_against_reference(backend, x, kw, dtype)


def plain_inputs(B=2, Lq=13, Lk=None, H=2, D=16, features=(), dtype=torch.float64):
    """Inputs of attention without the Transformer-XL term (T5, BERT-style, cross-attention): no r."""
    Lk = Lq if Lk is None else Lk
    x, kw = make_inputs(B=B, Lq=Lq, M=max(Lk - Lq, 0), H=H, D=D, dtype=dtype, features=features)
    del x["r"], x["r_r_bias"]
    if Lk < Lq:  # cross-attention: keys of another sequence
        x["k"], x["v"] = x["k"][:, :Lk].contiguous(), x["v"][:, :Lk].contiguous()
        if "key_padding_mask" in kw:
            kw["key_padding_mask"] = kw["key_padding_mask"][:, :Lk].contiguous()
    if "no_rw" in features:
        del x["r_w_bias"]
    return x, dict(kw, content_sees_self=False)


PLAIN = {
    # T5 encoder self-attention: bidirectional buckets, padding, scale 1
    "t5-encoder": dict(Lq=21, features=("padding", "t5", "no_rw"), scale=1.0),
    # T5 decoder with a KV cache: Lk = past + Lq, causal, unidirectional buckets
    "t5-decoder-cache": dict(Lq=9, Lk=23, features=("t5_uni", "causal", "no_rw"), scale=1.0),
    # cross-attention: shorter keys than queries, encoder padding, no bias
    "cross-shorter-keys": dict(Lq=17, Lk=6, features=("padding", "no_rw")),
    "cross-longer-keys": dict(Lq=5, Lk=19, features=("padding", "no_rw")),
    # plain attention keeping the content bias, with a dense mask and a query stream (T5 gradient via dr kernel)
    "plain-rw-dense-query": dict(Lq=15, features=("query", "dense", "t5")),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("case", PLAIN.values(), ids=PLAIN.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_and_t5_attention(backend, case, dtype):
    case = dict(case)
    x, kw = plain_inputs(**{k: case.pop(k) for k in ("Lq", "Lk", "features") if k in case})
    check_against_reference(backend, x, kw, dtype, **case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_query_row_is_an_ordinary_row_without_content_sees_self(backend):
    """T5 semantics: a row whose every key is padding has no visible key (uniform, as HF), and a padded
    position's own key is not special; with XLNet's rule the row would see itself."""
    x, kw = plain_inputs(B=2, Lq=8, features=("padding", "t5", "no_rw"))
    kw["key_padding_mask"][1] = True  # batch 1: all keys padding
    check_against_reference(backend, x, kw, torch.float32, empty_rows="uniform", scale=1.0)
    check_against_reference(backend, x, kw, torch.float32, empty_rows="zero", dropout_p=0.2, seed=5)
    x = {n: t.float() for n, t in on_device(x, backend).items()}
    kw = on_device(kw, backend)
    kw["t5_bias"] = kw["t5_bias"].float()
    own = two_stream_attention(**x, **dict(kw, content_sees_self=True), backend=backend)[0][1]
    torch.testing.assert_close(own, x["v"][1], rtol=1e-5, atol=1e-5)  # each row sees only itself
    none = two_stream_attention(**x, **kw, backend=backend)[0][1]
    assert torch.equal(none, torch.zeros_like(none))  # empty rows (zero mode)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_masks_match_without_r(backend):
    x, kw = plain_inputs(B=2, Lq=11, Lk=14, features=("t5_uni", "causal", "no_rw"), dtype=torch.float32)
    x, kw = on_device(x, backend), on_device(kw, backend)
    ref = reference.two_stream_attention(**x, **kw, dropout_p=0.4, seed=77)
    out = two_stream_attention(**x, **kw, dropout_p=0.4, seed=77, backend=backend)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("B,Lq,M,H,D,P", [
    pytest.param(1, 1, 0, 1, 16, 1, id="B1-L1-H1-D16-P1"),
    pytest.param(2, 7, 3, 3, 40, 2, id="B2-L7-M3-H3-D40-P2"),
    pytest.param(1, 33, 0, 2, 64, 6, id="B1-L33-H2-D64-P6"),
    pytest.param(1, 97, 11, 1, 16, 17, id="B1-L97-M11-H1-D16-P17"),
    pytest.param(2, 9, 0, 1, 16, 14, id="B2-L9-H1-D16-P14-duplicates"),
    pytest.param(1, 7, 2, 2, 128, 9, id="B1-L7-M2-H2-D128-P9"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_sizes(backend, B, Lq, M, H, D, P):
    x, kw = make_inputs(B=B, Lq=Lq, M=M, H=H, D=D, P=P, features=("query", "rank", "seg_ids"))
    check_against_reference(backend, x, kw, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_batch_r_and_short_r(backend, dtype):
    x, kw = make_inputs(B=2, Lq=12, M=4, H=2, D=16, P=3, per_batch_r=True, features=("query", "causal"))
    check_against_reference(backend, x, kw, dtype)
    # uni-style R = Lk + 1: rows >= R only occur for causally hidden pairs
    x, kw = make_inputs(B=2, Lq=12, M=4, H=2, D=16, P=3, R=17, features=("query", "causal"))
    check_against_reference(backend, x, kw, dtype)


@pytest.mark.parametrize("empty_rows", ["zero", "uniform"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop0.25"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend, empty_rows, dropout_p):
    x, kw = make_inputs(B=2, Lq=10, M=2, H=2, D=16, P=4, features=("query", "dense"))
    kw["attn_mask"][0, 3] = True  # content row 3 sees only itself; a query row at 3 sees nothing
    kw["attn_mask"][1] = True  # every query row of batch 1 is empty
    kw["target_pos"][0, 0] = 3
    check_against_reference(backend, x, kw, torch.float32, empty_rows=empty_rows, dropout_p=dropout_p, seed=99)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_reference(backend, dtype):
    x, kw = make_inputs(B=2, Lq=19, M=3, H=2, D=16, P=4, features=("query", "rank", "t5"))
    check_against_reference(backend, x, kw, dtype, dropout_p=0.3, seed=2**40 + 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_equals_reference_mask(backend):
    """With v = identity the outputs are the dropped probabilities: zeros must sit at the same places."""
    B, Lq, H = 2, 16, 2
    x, kw = make_inputs(B=B, Lq=Lq, H=H, D=Lq, P=3, dtype=torch.float32, features=("query",))
    x["v"] = torch.eye(Lq)[None, :, None, :].expand(B, Lq, H, Lq).contiguous()
    x, kw = on_device(x, backend), on_device(kw, backend)
    ref = reference.two_stream_attention(**x, **kw, dropout_p=0.5, seed=31)
    out = two_stream_attention(**x, **kw, dropout_p=0.5, seed=31, backend=backend)
    for a, b in zip(out, ref):
        assert torch.equal(a == 0, b == 0)
        torch.testing.assert_close(a, b)
    keep = philox_uniform(31, torch.arange(B * H * Lq * Lq, device=backend_device(backend)).view(B, H, Lq, Lq)) >= 0.5
    assert torch.equal(out[0].permute(0, 2, 1, 3) != 0, keep)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_time_major_views(backend):
    """HF hands time-major [L, B, H, D] tensors: transposed views are read through their strides."""
    x, kw = make_inputs(B=3, Lq=11, M=2, H=2, D=16, P=3, dtype=torch.float32, features=("query", "seg_ids"))
    x, kw = on_device(x, backend), on_device(kw, backend)
    views = {n: (t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() == 4 else t) for n, t in x.items()}
    a = two_stream_attention(**x, **kw, backend=backend)
    b = two_stream_attention(**views, **kw, backend=backend)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unsupported_inputs_give_reasons(backend):
    x, kw = make_inputs(B=1, Lq=4, H=1, D=8, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match="dtype torch.float64"):
        two_stream_attention(**on_device(x, backend), backend=backend)
    two_stream_attention(**on_device(x, backend))
    if backend != "triton":
        return
    x, kw = make_inputs(B=1, Lq=4, H=1, D=160, dtype=torch.float32)
    x = on_device(x, backend)
    with pytest.raises(BackendUnavailableError, match="head dim 160 > 128"):
        two_stream_attention(**x, backend=backend)
    # auto falls back to the reference for them
    two_stream_attention(**x)


_SM90_COMPILE = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import pyobjectives.kernels.two_stream_attention as A

FLOAT_IN = {"q", "qg", "k", "v", "r", "rw", "rr", "rs", "se", "oh", "og", "doh", "dog", "dq", "dqg", "dk", "dv"}
FP32 = {"lseh", "lseg", "deltah", "deltag", "deh", "deg", "bias_part", "dr_part", "dt_part", "t5", "wk", "rrr"}
OTHER = {"chunks": "*i32", "chunk_ptr": "*i32", "sorted": "*i32", "tpos": "*i64", "qrank": "*i32", "krank": "*i32",
         "kpm": "*u8", "mask": "*u8", "segd": "*u8", "segq": "*i64", "segk": "*i64"}


def arg_type(name, dt):
    if name.endswith("_ptr"):
        base = name[:-4]
        return OTHER.get(base) or ("*fp32" if base in FP32 else dt)
    return {"dropout_p": "fp32", "scale": "fp32", "seed": "i64"}.get(name, "i32")


features = dict(HAS_RANK=True, HAS_DENSE=True, HAS_KPM=True, CAUSAL=True, SEG_IDS=True, SEG_DENSE=True, HAS_T5=True,
                HAS_R=True, SEES_SELF=True, HAS_DROPOUT=True, EMPTY_UNIFORM=True)
t5_only = dict(HAS_R=False, SEES_SELF=False, HAS_RANK=False, SEG_IDS=False, SEG_DENSE=False)  # T5 / plain attention
failed = []
BM = A._row_blocks()["BM"]
for kernel, dt, D, BN, warps, stages, switches in (
        (A._fwd_kernel, "*bf16", 64, 32, 8, 2, {}), (A._dq_kernel, "*bf16", 64, 32, 8, 2, {}),
        (A._dkdv_kernel, "*bf16", 64, 16, 4, 2, {}), (A._dr_kernel, "*bf16", 64, BM, 8, 1, {}),
        (A._fwd_kernel, "*bf16", 128, 32, 8, 2, {}), (A._fwd_kernel, "*fp32", 64, 32, 4, 2, {}),
        (A._fwd_kernel, "*bf16", 64, 32, 8, 2, t5_only), (A._dq_kernel, "*bf16", 64, 32, 8, 2, t5_only),
        (A._dr_kernel, "*bf16", 64, BM, 8, 1, t5_only)):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    consts = dict(features, **switches, DOT_PREC="ieee" if dt == "*fp32" else "tf32", BM=BM, BN=BN, BD=D,
                  BAND=2 * BM, BQ=16)
    signature = {a: ("constexpr" if a in consts else arg_type(a, dt)) for a in fn.arg_names}
    try:
        triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))
    except Exception as exc:
        failed.append(f"{fn.__name__} {dt} D={D} {switches}: {type(exc).__name__}: {str(exc)[:800]}")
for dt in ("*bf16", "*fp32"):
    fn = A._delta_kernel
    consts = dict(ROWS=16, BD=64)
    signature = {a: ("constexpr" if a in consts else "*fp32" if a in ("o_ptr", "delta_ptr") else dt if a == "do_ptr"
                     else "i32") for a in fn.arg_names}
    try:
        triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=4, num_stages=1))
    except Exception as exc:
        failed.append(f"{fn.__name__} {dt}: {type(exc).__name__}: {str(exc)[:800]}")
print("\n".join(failed) or "all compiled")
sys.exit(1 if failed else 0)
'''


@requires_triton
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not exercise GPU lowering (layouts, tl.gather, constexpr sizes): compile the four
    kernels (and the delta pre-pass) with every feature switched on, at the H100 tile sizes, to a cubin for sm_90 with Triton's ptxas."""
    import os
    import subprocess
    import sys

    import triton
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton build has no bundled NVIDIA ptxas")
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("BM,BQ", [(16, 16), (32, 16), (64, 16)])
@requires_triton
def test_query_chunks_cover_every_row_once(BM, BQ):
    """Chunks (built with tensor ops) hold each valid query row exactly once, inside one BM position
    block, at most BQ rows each, grouped by batch in position order."""
    from pyobjectives.kernels.two_stream_attention import _query_chunks
    for _ in range(50):
        B, Lq, P = (int(torch.randint(1, n, ())) for n in (4, 100, 120))
        target_pos = torch.randint(-1, Lq, (B, P))
        order, chunks, chunk_ptr, n = _query_chunks(target_pos, Lq, BM, BQ)
        seen = torch.zeros(B, P, dtype=torch.long)
        for i, (b, m, start, count) in enumerate(chunks[:n].tolist()):
            assert chunk_ptr[b] <= i < chunk_ptr[b + 1] and 0 < count <= BQ
            rows = order[b, start:start + count].long()
            pos = target_pos[b, rows]
            assert ((pos // BM) == m).all() and (pos.diff() >= 0).all()
            seen[b, rows] += 1
        assert torch.equal(seen, (target_pos >= 0).long())
