"""Helpers shared by the Triton kernel modules."""

import os

import torch
import triton
import triton.language as tl

POISON_ENV = "PYOBJECTIVES_POISON_OUTPUTS"


def new_output(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer; NaN-filled when PYOBJECTIVES_POISON_OUTPUTS=1 so that tests
    catch any element a kernel forgets to write (integer buffers get -1 instead)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV, "0") == "1":
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
            torch.float64: tl.float64}


def interpreting() -> bool:
    """Whether Triton runs on the CPU interpreter (TRITON_INTERPRET=1) rather than compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def cast(x, DT: tl.constexpr, INTERP: tl.constexpr):
    """``x.to(DT)`` rounding to nearest even; the interpreter's own float32 -> bfloat16 cast truncates."""
    if INTERP and DT == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(DT)
    else:
        return x.to(DT)
