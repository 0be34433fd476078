"""``python -m pyobjectives info | compare``.

``info`` prints versions, the device and every backend x op as available or
unavailable with its reasons. ``compare`` runs each op on every backend that
can take it, at small realistic shapes, and prints the max error of outputs and
gradients against the float64 reference, the spec's tolerance verdict, and the
time relative to the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from . import __version__, functional, reference
from .backends import BACKEND_ENV, BACKENDS, OPS, PRIORITY, extension_module, triton_interpreter_enabled

#: Every environment variable the library reads, for ``info`` and the README.
ENV_VARS = {
    BACKEND_ENV: "backend used when a call says backend='auto' (auto, cuda, triton, cpu, reference)",
    "TRITON_INTERPRET": "1 runs Triton kernels on the CPU interpreter (correctness only, slow)",
    "PYOBJECTIVES_POISON_OUTPUTS": "1 fills kernel outputs with NaN before launch (tests: unwritten elements fail)",
    "FORCE_CUDA": "setup.py: build the CUDA sources even where no GPU is visible",
    "PYOBJECTIVES_SKIP_CUDA_BUILD": "setup.py: build only the C++ (CPU) sources",
    "PYOBJECTIVES_SKIP_BUILD": "setup.py: build no extension (the cpu / cuda backends then say why not)",
    "TORCH_CUDA_ARCH_LIST": "setup.py: GPU architectures to compile for",
    "MAX_JOBS": "setup.py: parallel compile jobs",
}
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3, torch.float64: 1e-10}


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception as exc:  # a broken optional dependency must not break info
        return f"not importable ({type(exc).__name__})"


def device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name()}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def info() -> None:
    print(f"pyobjectives {__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton       {_version('triton')}" + ("  [TRITON_INTERPRET=1: CPU interpreter]"
                                                  if triton_interpreter_enabled() else ""))
    print(f"transformers {_version('transformers')}")
    print(f"device       {device_name()}")
    ext = extension_module()
    if ext is not None:
        print(f"extension    pyobjectives._C (cpu kernels: {torch.get_num_threads()} threads, BLAS: {ext.blas_name()})")
    print()
    print(f"backends (auto tries {' > '.join(PRIORITY)}):")
    for op in OPS:
        print(f"  {op}")
        for name in PRIORITY:
            reasons = BACKENDS[name].op_reasons(op)
            status = "available" if not reasons else "unavailable: " + "; ".join(reasons)
            print(f"    {name:<10} {status}")
    print()
    print("environment:")
    for var, meaning in ENV_VARS.items():
        print(f"  {var:<29} {os.environ.get(var, '(unset)'):<10} {meaning}")


# --- compare ------------------------------------------------------------------------------

def _attention_case(device, dtype):
    B, Lq, M, H, D, P = 2, 64, 16, 4, 32, 11
    Lk = M + Lq
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    perm = torch.stack([torch.randperm(Lq, generator=g) for _ in range(B)]).int()
    target = perm >= Lq - P
    k_rank = torch.cat([torch.full((B, M), -(2**31), dtype=torch.int32),
                        torch.where(target, perm, torch.full_like(perm, -1))], 1)
    q_rank = torch.where(target, perm, torch.zeros_like(perm))
    target_pos = torch.stack([torch.nonzero(t)[:, 0] for t in target])
    seg = torch.cat([torch.zeros(B, M + Lq // 2), torch.ones(B, Lq - Lq // 2)], 1).long()
    grads = dict(q=rnd(B, Lq, H, D), k=rnd(B, Lk, H, D), v=rnd(B, Lk, H, D), r=rnd(Lk + Lq, H, D),
                 r_w_bias=rnd(H, D), r_r_bias=rnd(H, D), q_g=rnd(B, P, H, D), r_s_bias=rnd(H, D),
                 seg_embed=rnd(2, H, D))
    fixed = dict(target_pos=target_pos.to(device), q_rank=q_rank.to(device), k_rank=k_rank.to(device),
                 seg_q=seg[:, M:].to(device), seg_k=seg.to(device))
    shape = f"B{B} L{Lq} M{M} H{H} D{D} P{P} rank+seg"
    return shape, grads, fixed, functional.two_stream_attention, reference.two_stream_attention


def _t5_attention_case(device, dtype):
    """T5 encoder self-attention: no r, the bucket table read in-kernel, padding, scale 1."""
    B, L, H, D, buckets = 2, 96, 4, 32, 32
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    padding = torch.arange(L)[None, :] >= torch.tensor([[L], [L - 17]])
    grads = dict(q=rnd(B, L, H, D), k=rnd(B, L, H, D), v=rnd(B, L, H, D), t5_bias=rnd(buckets, H))
    fixed = dict(key_padding_mask=padding.to(device), t5_num_buckets=buckets, t5_max_distance=40, scale=1.0,
                 content_sees_self=False, empty_rows="uniform")
    return (f"B{B} L{L} H{H} D{D} t5 padding", grads, fixed, functional.two_stream_attention,
            reference.two_stream_attention)


def _rtd_case(device, dtype):
    B, L, Dd = 8, 128, 64
    g = torch.Generator().manual_seed(1)
    original = torch.randint(0, 1000, (B, L), generator=g)
    corrupted = torch.where(torch.rand(B, L, generator=g) < 0.15, torch.randint(0, 1000, (B, L), generator=g),
                            original)
    mask = (torch.arange(L)[None, :] < torch.randint(L // 2, L + 1, (B, 1), generator=g)).long()
    grads = dict(logits_or_hidden=torch.randn(B, L, Dd, generator=g, dtype=torch.float64).to(device),
                 head_weight=torch.randn(Dd, generator=g, dtype=torch.float64).to(device) / Dd**0.5,
                 head_bias=torch.randn((), generator=g, dtype=torch.float64).to(device))
    fixed = dict(corrupted_ids=corrupted.to(device), original_ids=original.to(device), attention_mask=mask.to(device))
    return f"B{B} L{L} Dd{Dd} fused head", grads, fixed, functional.rtd_loss, reference.rtd_loss


def _lce_case(device, dtype):
    N, E, V = 256, 64, 4099
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::7] = -100
    grads = dict(hidden=torch.randn(N, E, generator=g, dtype=torch.float64).to(device),
                 weight=torch.randn(V, E, generator=g, dtype=torch.float64).to(device) / E**0.5,
                 bias=torch.randn(V, generator=g, dtype=torch.float64).to(device))
    fixed = dict(targets=targets.to(device))
    return f"N{N} E{E} V{V}", grads, fixed, functional.linear_cross_entropy, reference.linear_cross_entropy


CASES = [("two_stream_attention", _attention_case), ("two_stream_attention", _t5_attention_case),
         ("rtd_loss", _rtd_case), ("linear_cross_entropy", _lce_case)]


def _run(fn: Callable, grads: dict, fixed: dict, dtype, **kw):
    """Outputs and gradients of one call; float inputs cast to ``dtype``, fresh leaves."""
    leaves = {n: t.detach().to(dtype).requires_grad_() for n, t in grads.items()}
    out = fn(**leaves, **fixed, **kw)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor)]
    weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).view_as(o) for o in outs]
    torch.autograd.backward([(o * w).sum() for o, w in zip(outs, weights)])
    return outs, {n: t.grad for n, t in leaves.items()}


def _median_ms(fn: Callable, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def compare(dtypes=("float32",), repeats: int = 5) -> list[dict]:
    """Run every op on every capable backend; returns the table rows (also printed)."""
    rows = []
    print(f"device: {device_name()}; torch {torch.__version__}; errors are max |x - float64 reference| "
          f"over outputs and every gradient; 'ok' = within 2 x same-dtype reference error + floor")
    header = f"{'op':<22} {'backend':<10} {'dtype':<9} {'shape':<32} {'out err':>9} {'grad err':>9} " \
             f"{'ref err':>9} {'policy':>6} {'ms':>9} {'vs ref':>7}"
    print(header)
    print("-" * len(header))
    for op, make in CASES:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for backend in PRIORITY:
                if BACKENDS[backend].op_reasons(op):
                    continue
                device = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
                shape, grads, fixed, fn, ref_fn = make(device, dtype)
                oracle_out, oracle_grads = _run(ref_fn, grads, fixed, torch.float64)
                ref_out, ref_grads = _run(fn, grads, fixed, dtype, backend="reference")
                inputs = {**{n: t.to(dtype) for n, t in grads.items()}, **fixed}
                reasons = BACKENDS[backend].not_supported_reasons(op, inputs)
                if reasons:
                    continue
                out, got_grads = _run(fn, grads, fixed, dtype, backend=backend)
                out_err = max(_max_err(a, b) for a, b in zip(out, oracle_out))
                grad_err = max(_max_err(got_grads[n], oracle_grads[n]) for n in grads)
                ref_err = max([_max_err(a, b) for a, b in zip(ref_out, oracle_out)]
                              + [_max_err(ref_grads[n], oracle_grads[n]) for n in grads])
                finite = all(torch.isfinite(o).all() for o in out) and all(
                    torch.isfinite(g).all() for g in got_grads.values())
                ok = finite and max(out_err, grad_err) <= 2 * ref_err + FLOOR[dtype]
                interpreted = backend == "triton" and triton_interpreter_enabled()
                if interpreted:
                    ms = ratio = None  # interpreter time says nothing about the kernel
                else:
                    ms = _median_ms(lambda: _run(fn, grads, fixed, dtype, backend=backend), repeats)
                    ref_ms = ms if backend == "reference" else _median_ms(
                        lambda: _run(fn, grads, fixed, dtype, backend="reference"), repeats)
                    ratio = ref_ms / ms
                row = dict(op=op, backend=backend, dtype=dtype_name, shape=shape, device=device_name(),
                           out_err=out_err, grad_err=grad_err, ref_err=ref_err, ok=ok, ms=ms, speedup=ratio)
                rows.append(row)
                ms_txt = "interp." if interpreted else f"{ms:9.2f}"
                ratio_txt = "-" if ratio is None else f"{ratio:6.2f}x"
                print(f"{op:<22} {backend:<10} {dtype_name:<9} {shape:<32} {out_err:9.2e} {grad_err:9.2e} "
                      f"{ref_err:9.2e} {'ok' if ok else 'FAIL':>6} {ms_txt:>9} {ratio_txt:>7}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyobjectives", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, backends and why any is unavailable")
    cmp = sub.add_parser("compare", help="every op on every available backend vs the float64 reference")
    cmp.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
                     help="test dtypes (default: float32 on CPU, float32 and bfloat16 on CUDA)")
    cmp.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median)")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    dtypes = args.dtypes or (("float32", "bfloat16") if torch.cuda.is_available() else ("float32",))
    rows = compare(dtypes, args.repeats)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
