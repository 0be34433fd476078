"""Helpers shared by the Triton kernel modules (imports Triton only through its callers)."""

import os

import torch

POISON_ENV = "PYOBJECTIVES_POISON_OUTPUTS"


def new_output(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output buffer; NaN-filled when PYOBJECTIVES_POISON_OUTPUTS=1 so that tests
    catch any element a kernel forgets to write (integer buffers get -1 instead)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get(POISON_ENV, "0") == "1":
        out.fill_(float("nan") if dtype.is_floating_point else -1)
    return out
