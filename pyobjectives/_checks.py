"""Argument checks shared by the public functions.

Every failure names the argument and says what was expected, in the style of
FlashAttention's ``CHECK_SHAPE`` / ``CHECK_DEVICE``: ``ValueError`` for a wrong
shape, device, range or option, ``TypeError`` for a wrong type or dtype.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch

from .reference.philox import SEED_RANGE

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tensor(name: str, value, dims: Sequence[tuple[str, int | None]], *, kind: str,
           device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Check one tensor argument.

    ``dims``: ``(label, size)`` per dimension, ``size=None`` for "any";
    ``kind``: "float", "int", "bool" or "any" (a mask given as bool, int or float);
    ``dtype``: exact dtype required (floats share the dtype of ``q`` / ``hidden``);
    ``device``: required device.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    labels = "[" + ", ".join(label for label, _ in dims) + "]"
    sizes = "[" + ", ".join("?" if size is None else str(size) for _, size in dims) + "]"
    if value.dim() != len(dims) or any(size is not None and s != size for (_, size), s in zip(dims, value.shape)):
        raise ValueError(f"{name} must have shape {labels} = {sizes}, got {tuple(value.shape)}")
    allowed = {"float": FLOAT_DTYPES, "int": INT_DTYPES, "bool": (torch.bool,),
               "any": (torch.bool,) + INT_DTYPES + FLOAT_DTYPES}[kind]
    if value.dtype not in allowed:
        what = "bool, int or float" if kind == "any" else kind
        raise TypeError(f"{name} must be a {what} tensor ({', '.join(map(str, allowed))}), got {value.dtype}")
    if dtype is not None and value.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype} (the dtype of the main input), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on device {device} (the device of the main input), got {value.device}")
    return value


def optional(name, value, dims, **kw):
    return None if value is None else tensor(name, value, dims, **kw)


def choice(name: str, value, options: Sequence) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


def number(name: str, value, *, low=None, high=None, low_open=False, high_open=True, integer=False) -> None:
    """``value`` in the interval given by ``low``/``high`` (``[low, high)`` by default)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (not integer and not math.isfinite(value)):
        raise TypeError(f"{name} must be a finite {'int' if integer else 'number'}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def seed(value, *, name: str = "seed"):
    """A Philox seed in [0, 2**63): an int, or a one-element integer CPU tensor (what
    :func:`pyobjectives.reference.draw_seed` returns under torch.compile), returned as a 0-dim int64 tensor."""
    if isinstance(value, torch.Tensor):
        integral = not (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool)
        if not integral or value.numel() != 1 or value.device.type != "cpu":
            raise TypeError(f"{name} must be an int or a one-element integer CPU tensor, got a {value.dtype} tensor "
                            f"of shape {tuple(value.shape)} on {value.device}")
        value = value.reshape(()).to(torch.int64)
        if values_checkable(value):
            number(name, int(value), low=0, high=SEED_RANGE, integer=True)
        return value
    number(name, value, low=0, high=SEED_RANGE, integer=True)
    return value


DEBUG_ENV = "PYOBJECTIVES_DEBUG"


def debug_mode() -> bool:
    """``PYOBJECTIVES_DEBUG=1``: value checks on accelerator tensors too, at one host sync per check."""
    return os.environ.get(DEBUG_ENV, "0") not in ("", "0")


def reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host costs no device synchronisation (its data is host memory)."""
    return t.device.type == "cpu"


def values_checkable(t: torch.Tensor) -> bool:
    """Whether a value-range check may read ``t`` back to the host now.

    Always for CPU tensors; for accelerator tensors only in debug mode, because each read waits for the
    device queue to drain (a sync per layer per step). Never while tracing or graph-capturing. Unchecked
    values are safe: every kernel treats an out-of-range index as a padding / ignored row.
    """
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    if reads_are_free(t):
        return True
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return debug_mode()


def int_range(name: str, t: torch.Tensor | None, low: int, high: int, *, what: str = "", allow=None) -> None:
    """Every element of ``t`` in ``[low, high)`` (or equal to ``allow``), when :func:`values_checkable`."""
    if t is None or t.numel() == 0 or not values_checkable(t):
        return
    ok = (t >= low) & (t < high)
    if allow is not None:
        ok |= t == allow
    if not bool(ok.all()):
        bad = t[~ok][0].item()
        extra = f" or {allow}" if allow is not None else ""
        raise ValueError(f"{name} must be in [{low}, {high}){extra}{what}, got {bad}")


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def both_or_neither(**named) -> None:
    given = [k for k, v in named.items() if v is not None]
    if given and len(given) != len(named):
        missing = [k for k in named if k not in given]
        raise ValueError(f"{' and '.join(named)} go together: got {', '.join(given)} without {', '.join(missing)}")
