"""Backend registry: who can run which op on which inputs, and why not.

Each backend declares, per op, an implementation and a ``not_supported_reasons``
check over the (already validated) call arguments. A backend as a whole can be
unusable (library missing, extension not built, no GPU); then every op on it
reports that reason. ``backend="auto"`` takes the first capable backend in
:data:`PRIORITY` and always ends at the reference; an explicitly named backend
never falls back: it raises :class:`BackendUnavailableError` with the reasons.

Importing this module never imports Triton (it is probed lazily, on the first
dispatch or ``python -m pyobjectives info``). The compiled extension, when built,
is loaded at import (a small shared library registering its ops), so that
dispatch under ``torch.compile`` needs no import: everything :func:`resolve`
runs while being traced is plain Python over tensor metadata.

The ``cuda`` backend is checked once per op, device and dtype against the
reference on a tiny fixed input (:mod:`pyobjectives.selfcheck`) before it runs a
call; a mismatch takes it out of dispatch for that op with the reason.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

OPS = ("two_stream_attention", "rtd_loss", "linear_cross_entropy")
#: Order tried by ``backend="auto"``: fused GPU code first, the reference last.
PRIORITY = ("cuda", "triton", "cpu", "reference")
BACKEND_ENV = "PYOBJECTIVES_BACKEND"

Reasons = list
ReasonsFn = Callable[[Mapping[str, Any]], Reasons]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the given call; the message lists why."""


@dataclass
class OpImpl:
    """One op on one backend: ``loader`` returns the callable (imported on first use)."""

    loader: Callable[[], Callable[..., Any]]
    not_supported_reasons: ReasonsFn = lambda inputs: []
    #: Why this op cannot run on the backend at all (e.g. its kernels were not built), beyond the backend's own.
    unavailable: Callable[[], Reasons] = lambda: []
    loaded: Callable[..., Any] | None = None


@dataclass
class Backend:
    name: str
    description: str
    #: Reasons the whole backend is unusable in this process (cached after the first probe).
    probe: Callable[[], Reasons]
    #: Reasons a particular call cannot run here even though the library works (e.g. tensor device).
    common_reasons: ReasonsFn = lambda inputs: []
    ops: dict = field(default_factory=dict)
    #: Verifies the backend on a call's device and dtype before it is used: (op, inputs, explicit) -> reasons.
    verify: Callable[[str, Mapping[str, Any], bool], Reasons] | None = None
    #: Reasons recorded by failed verifications, per op (reported by op_reasons).
    verify_failures: Callable[[str], Reasons] = lambda op: []

    #: Probe result, filled on first use (a plain attribute: torch.compile traces through it).
    probed: Reasons | None = None

    @property
    def unavailable_reasons(self) -> Reasons:
        if self.probed is None:
            self.probed = self.probe()
        return self.probed

    def register(self, op: str, loader: Callable[[], Callable[..., Any]],
                 not_supported_reasons: ReasonsFn | None = None, unavailable: Callable[[], Reasons] | None = None):
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        self.ops[op] = OpImpl(loader, not_supported_reasons or (lambda inputs: []), unavailable or (lambda: []))

    def op_reasons(self, op: str) -> Reasons:
        """Why this backend cannot run ``op`` at all, independent of inputs."""
        if op not in self.ops:
            return [f"pyobjectives has no {self.name} implementation of {op}"]
        return list(self.unavailable_reasons) + self.ops[op].unavailable() + self.verify_failures(op)

    def not_supported_reasons(self, op: str, inputs: Mapping[str, Any], explicit: bool = False) -> Reasons:
        """Why this backend cannot run ``op`` on these inputs; empty means it can.

        Runs the backend's verification (once per op, device and dtype) when everything else allows
        the call; ``explicit`` (a call naming the backend) lets an unverified backend run while
        torch.compile traces, where no check can run."""
        if op not in self.ops:
            return self.op_reasons(op)
        reasons = list(self.unavailable_reasons) + self.ops[op].unavailable()
        if reasons:
            return reasons
        reasons = self.common_reasons(inputs) + self.ops[op].not_supported_reasons(inputs)
        if reasons or self.verify is None:
            return reasons
        return self.verify(op, inputs, explicit)

    def implementation(self, op: str) -> Callable[..., Any]:
        impl = self.ops[op]
        if impl.loaded is None:
            impl.loaded = _autocast_neutral(impl.loader())
        return impl.loaded


def _autocast_neutral(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Every backend computes in the dtype of its inputs, with autocast off inside.

    Without this, autocast would re-cast the tensor math *inside* an implementation (the
    reference's products, the Triton launcher's fp32 bias products) while the native kernels
    ignore it, so a result under autocast would depend on the backend. Under autocast the
    inputs usually arrive in the lower precision already (from autocast-ed projections);
    the fused kernels then accumulate in fp32 and return the input dtype.
    """
    if fn is None:
        return fn

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return fn(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)
    return run


def _tensors(inputs: Mapping[str, Any]):
    return [t for t in inputs.values() if isinstance(t, torch.Tensor)]


# --- probes ---------------------------------------------------------------------------

def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


#: Whether Triton is installed, looked up without importing it.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _probe_triton() -> Reasons:
    if not _TRITON_INSTALLED:
        return ["Triton is not installed"]
    if not torch.compiler.is_compiling():  # a traced first call cannot import; the kernels' import then reports
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything
            return [f"Triton is not importable ({type(exc).__name__}: {exc})"]
    if not triton_interpreter_enabled() and not torch.cuda.is_available():
        return ["no CUDA device, and TRITON_INTERPRET=1 (the CPU interpreter) is not set"]
    return []


def _triton_device_reasons(inputs: Mapping[str, Any]) -> Reasons:
    devices = {t.device.type for t in _tensors(inputs)}
    if triton_interpreter_enabled():
        return [] if devices <= {"cpu"} else [f"under TRITON_INTERPRET=1 inputs must be on the CPU, got {sorted(devices)}"]
    return [] if devices <= {"cuda"} else [f"Triton needs CUDA tensors (or TRITON_INTERPRET=1), got {sorted(devices)}"]


def _load_native():
    """``pyobjectives.native`` (the extension's ops with their fake and autograd registrations) and why not."""
    if importlib.util.find_spec("pyobjectives._C") is None:
        return None, ("the C++/CUDA extension pyobjectives._C is not built "
                      "(pip install --no-build-isolation -e . with csrc/ sources present)")
    try:
        return importlib.import_module("pyobjectives.native"), None
    except Exception as exc:  # e.g. an extension built against another torch
        return None, f"pyobjectives._C does not load ({type(exc).__name__}: {exc})"


_NATIVE, _NATIVE_ERROR = _load_native()


def extension_module():
    """The compiled ``pyobjectives._C`` extension, or None when it was not built (or does not load)."""
    return None if _NATIVE is None else _NATIVE._C


# Read once at import: the dispatch below runs while torch.compile traces, where C functions cannot be called.
_CUDA_BUILT = _NATIVE is not None and bool(_NATIVE._C.cuda_built())
_CUDA_ATTENTION_BUILT = _CUDA_BUILT and bool(_NATIVE._C.cuda_attention_built())


def cuda_built() -> bool:
    """Whether ``pyobjectives._C`` was compiled with its CUDA kernels."""
    return _CUDA_BUILT


def _probe_cuda() -> Reasons:
    reasons = [_NATIVE_ERROR] if _NATIVE is None else []
    if _NATIVE is not None and not cuda_built():
        reasons.append("pyobjectives._C was built without CUDA (no nvcc / CUDA torch at build time)")
    if not torch.cuda.is_available():
        reasons.append("torch reports no CUDA device")
    return reasons


def _cuda_attention_unavailable() -> Reasons:
    if not _CUDA_BUILT or _CUDA_ATTENTION_BUILT:
        return []
    return ["the CUDA attention kernels are not built (csrc/cuda/two_stream_attention_*.cu absent at build time, "
            "or no CUTLASS headers)"]


def _verify_cuda(op: str, inputs: Mapping[str, Any], explicit: bool) -> Reasons:
    from pyobjectives import selfcheck
    return selfcheck.reasons(op, inputs, explicit)


def _cuda_verify_failures(op: str) -> Reasons:
    from pyobjectives import selfcheck
    return selfcheck.recorded_failures(op)


def _probe_cpu() -> Reasons:
    return [] if _NATIVE is not None else [_NATIVE_ERROR]


def _device_is(kind: str) -> ReasonsFn:
    def reasons(inputs):
        devices = {t.device.type for t in _tensors(inputs)}
        return [] if devices <= {kind} else [f"needs {kind} tensors, got {sorted(devices)}"]
    return reasons


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", "pure PyTorch, exact; any device and dtype", probe=lambda: []),
    "triton": Backend("triton", "Triton kernels (CUDA, or the CPU interpreter with TRITON_INTERPRET=1)",
                      probe=_probe_triton, common_reasons=_triton_device_reasons),
    "cuda": Backend("cuda", "CUDA C++ kernels of the compiled extension", probe=_probe_cuda,
                    common_reasons=_device_is("cuda"), verify=_verify_cuda, verify_failures=_cuda_verify_failures),
    "cpu": Backend("cpu", "native CPU kernels of the compiled extension", probe=_probe_cpu,
                   common_reasons=_device_is("cpu")),
}
BACKEND_NAMES = ("auto",) + PRIORITY


def _load_reference(name: str):
    def loader():
        from pyobjectives import reference
        return getattr(reference, name)
    return loader


def _register_triton_kernels() -> None:
    """The triton backend implements op X in ``pyobjectives.kernels.X``, which defines ``X(**inputs)``
    (the reference's keyword arguments) and ``not_supported_reasons(inputs)``. Finding the module
    does not import it, so Triton is imported only after the backend's probe has passed."""
    for op in OPS:
        module = f"pyobjectives.kernels.{op}"
        if importlib.util.find_spec(module) is None:
            continue
        BACKENDS["triton"].register(
            op, loader=lambda module=module, op=op: getattr(importlib.import_module(module), op),
            not_supported_reasons=lambda inputs, module=module: importlib.import_module(module).not_supported_reasons(inputs))


def _register_native(backend: str) -> None:
    """The compiled backends run the ops of ``pyobjectives._C`` through :mod:`pyobjectives.native`."""
    if _NATIVE is None:
        for op in OPS:
            BACKENDS[backend].register(op, loader=lambda: None)
        return
    for op in OPS:
        reasons = getattr(_NATIVE, f"{op}_{backend}_not_supported_reasons", None) or getattr(
            _NATIVE, f"{op}_not_supported_reasons")
        unavailable = _cuda_attention_unavailable if backend == "cuda" and op == "two_stream_attention" else None
        BACKENDS[backend].register(op, loader=lambda op=op: getattr(_NATIVE, op), not_supported_reasons=reasons,
                                   unavailable=unavailable)


for _op in OPS:
    BACKENDS["reference"].register(_op, _load_reference(_op))
_register_triton_kernels()
_register_native("cpu")
_register_native("cuda")


# --- dispatch -------------------------------------------------------------------------

def resolve(op: str, backend: str, inputs: Mapping[str, Any]) -> tuple[str, Callable[..., Any]]:
    """Pick the backend for one call; returns ``(name, implementation)``."""
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        override = os.environ.get(BACKEND_ENV, "auto")
        if override not in BACKEND_NAMES:
            raise ValueError(f"{BACKEND_ENV} must be one of {BACKEND_NAMES}, got {override!r}")
        backend = override
    if backend != "auto":
        reasons = BACKENDS[backend].not_supported_reasons(op, inputs, explicit=True)
        if reasons:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op}: " + "; ".join(reasons))
        return backend, BACKENDS[backend].implementation(op)
    for name in PRIORITY:
        if not BACKENDS[name].not_supported_reasons(op, inputs):
            return name, BACKENDS[name].implementation(op)
    raise AssertionError("the reference backend accepts every validated input")


def available(op: str, inputs: Mapping[str, Any] | None = None) -> list[str]:
    """Backends (in priority order) that can run ``op``; with ``inputs``, on those inputs."""
    return [name for name in PRIORITY
            if not (BACKENDS[name].op_reasons(op) if inputs is None
                    else BACKENDS[name].not_supported_reasons(op, inputs))]
