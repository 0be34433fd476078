"""The cuda backend: why it cannot run here (any machine), the self-check that guards dispatch (run on
the cpu backend, so it is tested without a GPU), and, with a CUDA device, the CUDA ops themselves:
agreement with the cpu kernels, the self-check on the device, the shared header's bits on the
device, and compute-sanitizer runs (opcheck of the CUDA ops: test_native.py). Every GPU test skips
with the backend's own reasons elsewhere."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import backend_reasons

from pyobjectives import BackendUnavailableError, backends, linear_cross_entropy, rtd_loss, selfcheck
from pyobjectives.reference.attention import t5_relative_bucket
from pyobjectives.reference.philox import philox_uniform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_REASONS = backend_reasons("cuda", "rtd_loss")
requires_cuda = pytest.mark.skipif(bool(CUDA_REASONS), reason="cuda backend unavailable: " + "; ".join(CUDA_REASONS))
requires_cpu = pytest.mark.skipif(bool(backend_reasons("cpu")), reason="; ".join(backend_reasons("cpu")))
KNOWN_REASONS = ("pyobjectives._C was built without CUDA", "torch reports no CUDA device",
                 "the C++/CUDA extension pyobjectives._C is not built", "pyobjectives._C does not load")


def test_info_says_why_cuda_cannot_run():
    out = subprocess.run([sys.executable, "-m", "pyobjectives", "info"], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert "no cuda implementation" not in out, out
    if CUDA_REASONS:
        cuda_lines = [line for line in out.splitlines() if line.strip().startswith("cuda ")]
        assert len(cuda_lines) == 3, out
        assert all(any(r in line for r in KNOWN_REASONS) for line in cuda_lines), out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons of a machine without a GPU")
def test_cuda_reasons_without_a_device():
    for op in backends.OPS:
        reasons = backends.BACKENDS["cuda"].op_reasons(op)
        assert "torch reports no CUDA device" in reasons
        if backends.extension_module() is not None and not backends.cuda_built():
            assert "pyobjectives._C was built without CUDA (no nvcc / CUDA torch at build time)" in reasons
    assert backends.resolve("rtd_loss", "auto", {"logits_or_hidden": torch.randn(3)})[0] != "cuda"


# --- the self-check, exercised through the cpu backend ---------------------------------------------

@pytest.fixture
def cpu_verified(monkeypatch):
    """The cpu backend guarded by the self-check, with a fresh record."""
    monkeypatch.setattr(selfcheck, "_RESULTS", {})
    cpu = backends.BACKENDS["cpu"]
    monkeypatch.setattr(cpu, "verify", lambda op, inputs, explicit: selfcheck.reasons(op, inputs, explicit, "cpu"))
    monkeypatch.setattr(cpu, "verify_failures", lambda op: selfcheck.recorded_failures(op, "cpu"))
    return cpu


def rtd_inputs():
    return {"logits_or_hidden": torch.randn(2, 9), "corrupted_ids": torch.randint(0, 5, (2, 9)),
            "original_ids": torch.randint(0, 5, (2, 9))}


@requires_cpu
@pytest.mark.parametrize("op", backends.OPS)
def test_self_check_passes_for_a_correct_backend(cpu_verified, op):
    t = torch.zeros(1)
    assert selfcheck.reasons(op, {"x": t}, backend="cpu") == []
    assert selfcheck._RESULTS[("cpu", op, "cpu", torch.float32)] == []


@requires_cpu
def test_self_check_failure_takes_the_backend_out_of_auto(cpu_verified, monkeypatch):
    impl = cpu_verified.ops["rtd_loss"]
    good = cpu_verified.implementation("rtd_loss")

    def off_by_ten_percent(**kw):
        out = good(**kw)
        return (out[0] * 1.1, out[1]) if isinstance(out, tuple) else out * 1.1
    monkeypatch.setattr(impl, "loaded", off_by_ten_percent)
    name, _ = backends.resolve("rtd_loss", "auto", rtd_inputs())
    assert name not in ("cpu", "cuda")
    with pytest.raises(BackendUnavailableError, match="self-check against the reference failed: .*loss"):
        rtd_loss(**rtd_inputs(), backend="cpu")
    assert any("self-check" in r for r in cpu_verified.op_reasons("rtd_loss"))
    assert cpu_verified.op_reasons("linear_cross_entropy") == []


@requires_cpu
def test_self_check_errors_are_failures(cpu_verified, monkeypatch):
    def broken(**kw):
        raise RuntimeError("illegal memory access")
    monkeypatch.setattr(cpu_verified.ops["linear_cross_entropy"], "loaded", broken)
    reasons = selfcheck.reasons("linear_cross_entropy", {"hidden": torch.randn(2, 3)}, backend="cpu")
    assert reasons == ["self-check against the reference failed: RuntimeError: illegal memory access"]


@requires_cpu
def test_self_check_while_tracing_uses_the_record(cpu_verified, monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    inputs = rtd_inputs()
    assert "has not run" in selfcheck.reasons("rtd_loss", inputs, backend="cpu")[0]
    assert selfcheck.reasons("rtd_loss", inputs, explicit=True, backend="cpu") == []
    assert selfcheck._RESULTS == {}  # nothing ran while tracing
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert selfcheck.reasons("rtd_loss", inputs, backend="cpu") == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert selfcheck.reasons("rtd_loss", inputs, backend="cpu") == []


# --- on a CUDA device ----------------------------------------------------------------------------

def cuda_and_cpu(fn):
    """fn(device) on cuda and on cpu (the cpu kernels define the semantics the CUDA ones mirror)."""
    return fn("cuda"), fn("cpu")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64, torch.float32, torch.float16])
@pytest.mark.parametrize("D", [None, 24, 29], ids=["logits", "head-D24", "head-D29"])
def test_rtd_cuda_matches_cpu_kernels(dtype, mask_dtype, D):
    lead = (5, 1001)  # vector groups, a tail, several chunks of the fused-head form
    x = torch.randn(*lead, *(() if D is None else (D,))).to(dtype)
    w = None if D is None else torch.randn(D) * 0.3
    orig = torch.randint(0, 50, lead)
    corr = torch.where(torch.rand(lead) < 0.3, torch.randint(0, 50, lead), orig)
    mask = (torch.rand(lead) > 0.1).to(mask_dtype)

    def run(dev):
        xs = x.to(dev).requires_grad_()
        ws = None if w is None else w.to(dev).requires_grad_()
        loss, stats = rtd_loss(xs, corr.to(dev), orig.to(dev), mask.to(dev), head_weight=ws, return_stats=True,
                               backend=dev)
        loss.backward()
        return loss, stats, xs.grad, None if ws is None else ws.grad
    (l_cu, s_cu, dx_cu, dw_cu), (l_cpu, s_cpu, dx_cpu, dw_cpu) = cuda_and_cpu(run)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(l_cu.cpu(), l_cpu, **tol)
    for k in s_cpu:
        torch.testing.assert_close(s_cu[k].cpu(), s_cpu[k], **tol)
    torch.testing.assert_close(dx_cu.cpu(), dx_cpu, **tol)
    if dw_cpu is not None:
        torch.testing.assert_close(dw_cu.cpu(), dw_cpu, **tol)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("N,V", [(37, 1000), (300, 30522)], ids=["N37-V1000", "N300-V30522"])
def test_linear_cross_entropy_cuda_samples_equal_cpu(dtype, N, V):
    """Exact logits (coarse-grid inputs): sampled and argmax ids equal the cpu kernel's bit for bit."""
    E = 32
    h = (torch.randint(-2, 3, (N, E)) / 2.0).to(dtype)
    w = (torch.randint(-4, 5, (V, E)) / 4.0).to(dtype)
    t = torch.randint(0, V, (N,))
    ban = torch.randint(0, V, (N,))

    def run(dev):
        hs, ws = h.to(dev).requires_grad_(), w.to(dev).requires_grad_()
        loss, sampled, argmax = linear_cross_entropy(hs, ws, t.to(dev), sample=True, temperature=0.8, seed=99,
                                                     disallow=ban.to(dev), return_argmax=True, backend=dev)
        loss.backward()
        return loss, sampled, argmax, hs.grad, ws.grad
    (l_cu, s_cu, a_cu, dh_cu, dw_cu), (l_cpu, s_cpu, a_cpu, dh_cpu, dw_cpu) = cuda_and_cpu(run)
    assert torch.equal(s_cu.cpu(), s_cpu)
    assert torch.equal(a_cu.cpu(), a_cpu)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(l_cu.cpu(), l_cpu, **tol)
    torch.testing.assert_close(dh_cu.cpu(), dh_cpu, **tol)
    torch.testing.assert_close(dw_cu.cpu(), dw_cpu, **tol)


@requires_cuda
def test_header_functions_on_the_device():
    offsets = torch.cat([torch.arange(4096), torch.tensor([2**32 - 1, 2**32, 2**40 + 3, 2**62 + 17])])
    for seed in (0, 1, 2**32 + 5, 2**63 - 1):
        got = torch.ops.pyobjectives.philox_uniform(seed, offsets.cuda())
        assert torch.equal(got.cpu(), philox_uniform(seed, offsets))
        run = torch.ops.pyobjectives.philox_uniform_run(seed, torch.tensor(2**32 - 21).cuda(), 77)
        assert torch.equal(run.cpu(), philox_uniform(seed, torch.arange(2**32 - 21, 2**32 + 56)))
    rel = torch.arange(-5000, 5001)
    for bidirectional, buckets, distance in [(True, 32, 128), (False, 32, 128), (True, 4, 3)]:
        got = torch.ops.pyobjectives.t5_bucket(rel.cuda(), bidirectional, buckets, distance)
        want = t5_relative_bucket(rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
        assert torch.equal(got.cpu(), want)


@requires_cuda
@pytest.mark.parametrize("op", backends.OPS)
def test_self_check_passes_on_the_device(op):
    dtype = torch.bfloat16 if op == "two_stream_attention" else torch.float32
    if backends.BACKENDS["cuda"].ops[op].unavailable():
        pytest.skip("; ".join(backends.BACKENDS["cuda"].ops[op].unavailable()))
    assert selfcheck.reasons(op, {"x": torch.zeros(1, device="cuda", dtype=dtype)}) == []


_SANITIZER_SCRIPT = r'''
import torch, pyobjectives as po
dev = "cuda"
for D in (None, 24):
    x = torch.randn(3, 37, *(() if D is None else (D,)), device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = None if D is None else torch.randn(D, device=dev, requires_grad=True)
    ids = torch.randint(0, 9, (3, 37), device=dev)
    po.rtd_loss(x, ids.roll(1), ids, ids > 2, head_weight=w, backend="cuda").backward()
h = torch.randn(21, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
w = torch.randn(301, 32, device=dev, dtype=torch.bfloat16, requires_grad=True)
t = torch.randint(0, 301, (21,), device=dev)
loss, s = po.linear_cross_entropy(h, w, t, sample=True, seed=3, backend="cuda")
loss.backward()
torch.ops.pyobjectives.philox_uniform(5, torch.arange(1000, device=dev))
torch.cuda.synchronize()
print("ok")
'''


@requires_cuda
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer_clean(tool):
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # memcheck sees each allocation's bounds
    proc = subprocess.run(["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", sys.executable, "-c",
                           _SANITIZER_SCRIPT], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
