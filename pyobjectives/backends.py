"""Backend registry: who can run which op on which inputs, and why not.

Each backend declares, per op, an implementation and a ``not_supported_reasons``
check over the (already validated) call arguments. A backend as a whole can be
unusable (library missing, extension not built, no GPU); then every op on it
reports that reason. ``backend="auto"`` takes the first capable backend in
:data:`PRIORITY` and always ends at the reference; an explicitly named backend
never falls back: it raises :class:`BackendUnavailableError` with the reasons.

Importing this module imports neither Triton nor the compiled extension; both
are probed lazily, on the first dispatch or ``python -m pyobjectives info``.
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


@dataclass
class Backend:
    name: str
    description: str
    #: Reasons the whole backend is unusable in this process (cached after the first probe).
    probe: Callable[[], Reasons]
    #: Reasons a particular call cannot run here even though the library works (e.g. tensor device).
    common_reasons: ReasonsFn = lambda inputs: []
    ops: dict = field(default_factory=dict)

    @functools.cached_property
    def unavailable_reasons(self) -> Reasons:
        return self.probe()

    def register(self, op: str, loader: Callable[[], Callable[..., Any]], not_supported_reasons: ReasonsFn | None = None):
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        self.ops[op] = OpImpl(loader, not_supported_reasons or (lambda inputs: []))

    def op_reasons(self, op: str) -> Reasons:
        """Why this backend cannot run ``op`` at all, independent of inputs."""
        if op not in self.ops:
            return [f"pyobjectives has no {self.name} implementation of {op}"]
        return list(self.unavailable_reasons)

    def not_supported_reasons(self, op: str, inputs: Mapping[str, Any]) -> Reasons:
        """Why this backend cannot run ``op`` on these inputs; empty means it can."""
        reasons = self.op_reasons(op)
        if reasons:
            return reasons
        return self.common_reasons(inputs) + self.ops[op].not_supported_reasons(inputs)

    def implementation(self, op: str) -> Callable[..., Any]:
        return _load(self.name, op)


@functools.lru_cache(maxsize=None)
def _load(backend: str, op: str) -> Callable[..., Any]:
    return BACKENDS[backend].ops[op].loader()


def _tensors(inputs: Mapping[str, Any]):
    return [t for t in inputs.values() if isinstance(t, torch.Tensor)]


# --- probes ---------------------------------------------------------------------------

def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _probe_triton() -> Reasons:
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


def extension_module():
    """The compiled ``pyobjectives._C`` extension, or None when it was not built (or does not load)."""
    try:
        return importlib.import_module("pyobjectives._C")
    except (ImportError, OSError):
        return None


_NOT_BUILT = ("the C++/CUDA extension pyobjectives._C is not built "
              "(pip install --no-build-isolation -e . with csrc/ sources present)")


def _probe_cuda() -> Reasons:
    reasons = []
    if extension_module() is None:
        reasons.append(_NOT_BUILT)
    if not torch.cuda.is_available():
        reasons.append("torch reports no CUDA device")
    return reasons


def _probe_cpu() -> Reasons:
    if extension_module() is None:
        return [_NOT_BUILT]
    try:
        importlib.import_module("pyobjectives.native")
    except Exception as exc:  # e.g. an extension built against another torch
        return [f"pyobjectives._C does not load its ops ({type(exc).__name__}: {exc})"]
    return []


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
                    common_reasons=_device_is("cuda")),
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
    """The compiled backends run the ops of ``pyobjectives._C`` through :mod:`pyobjectives.native`,
    which is imported only after the backend's probe found the extension."""
    def loader(op):
        return lambda: getattr(importlib.import_module("pyobjectives.native"), op)

    def reasons(op):
        return lambda inputs: getattr(importlib.import_module("pyobjectives.native"),
                                      f"{'attention' if op == 'two_stream_attention' else op}_not_supported_reasons")(inputs)

    for op in OPS:
        BACKENDS[backend].register(op, loader=loader(op), not_supported_reasons=reasons(op))


for _op in OPS:
    BACKENDS["reference"].register(_op, _load_reference(_op))
_register_triton_kernels()
_register_native("cpu")


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
        reasons = BACKENDS[backend].not_supported_reasons(op, inputs)
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
