"""Shared test tools: the spec's tolerance policy, dtype ids, seeded fresh inputs."""

import os
import zlib

import pytest
import torch

# Triton reads TRITON_INTERPRET when its own jit functions (tl.rand, ...) are created, i.e. on
# import: import it now, in interpreter mode unless the caller chose otherwise (GPU runs set 0).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN so that an element a kernel forgets to write fails the test.
os.environ["PYOBJECTIVES_POISON_OUTPUTS"] = "1"
try:
    import triton  # noqa: F401
except ImportError:
    pass

#: Absolute floor added to the 2x rule, per test dtype (spec: tolerance policy).
FLOOR = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 2e-3}
DTYPE_ID = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def max_err(x: torch.Tensor, oracle: torch.Tensor) -> float:
    return (x.double() - oracle.double()).abs().max().item() if x.numel() else 0.0


def assert_policy(name: str, candidate: torch.Tensor, same_dtype_ref: torch.Tensor, oracle: torch.Tensor, dtype):
    """Spec policy: err(candidate vs float64 oracle) <= 2 * err(same-dtype reference) + floor; never NaN/Inf."""
    assert candidate.shape == oracle.shape, f"{name}: shape {tuple(candidate.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(candidate).all(), f"{name}: NaN or Inf"
    err, ref_err = max_err(candidate, oracle), max_err(same_dtype_ref, oracle)
    bound = 2 * ref_err + FLOOR[dtype]
    assert err <= bound, f"{name}: error {err:.3e} > 2 x reference error {ref_err:.3e} + floor {FLOOR[dtype]:.0e}"


@pytest.fixture(autouse=True)
def _seed_everything(request):
    # Fresh inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_torch_thread():
    """Small tensors only: torch's intra-op threads just contend with the interpreter (and with
    other jobs on a small box), which can make a test 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The fused backends every backend-parametrized test runs on (the reference is the oracle).
FUSED_BACKENDS = ("cuda", "triton", "cpu")


def backend_reasons(name: str, op: str = "two_stream_attention") -> list:
    from pyobjectives.backends import BACKENDS
    return BACKENDS[name].op_reasons(op)


def fused_backend_params(op: str = "two_stream_attention"):
    """``pytest.param`` per fused backend, skipped with the backend's own reasons when it cannot run here."""
    params = []
    for name in FUSED_BACKENDS:
        reasons = backend_reasons(name, op)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(
            bool(reasons), reason=f"{name} backend unavailable: " + "; ".join(reasons))))
    return params


def backend_device(backend: str) -> str:
    """Where a backend's test inputs live: cuda on the GPU, Triton on the GPU unless interpreting, cpu on the CPU."""
    from pyobjectives.backends import triton_interpreter_enabled
    if backend == "cuda":
        return "cuda"
    if backend == "triton" and torch.cuda.is_available() and not triton_interpreter_enabled():
        return "cuda"
    return "cpu"


def skip_unsupported_dtype(backend: str, dtype) -> None:
    if backend in ("cpu", "cuda") and dtype == torch.float64:
        pytest.skip(f"the {backend} backend computes in float32 for float32 / bfloat16 / float16 inputs; "
                    "float64 calls go to the reference")


def skip_if_refused(backend: str, error: Exception) -> None:
    """A backend that declines these inputs (dtype, head dim, ...) is skipped for them; a failed
    self-check is a failure, never a skip."""
    if "self-check" in str(error):
        raise error
    pytest.skip(f"{backend} declines these inputs: {error}")
