"""Triton side of the shared RNG: fills a tensor with ``tl.rand(seed, offset)``.

The reference (``pyobjectives.reference.philox``) must equal this bit for bit;
kernels that need noise call ``tl.rand`` with the offsets documented there.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _uniform_kernel(out_ptr, offset_ptr, seed, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = idx < n
    offset = tl.load(offset_ptr + idx, mask=in_range, other=0)
    tl.store(out_ptr + idx, tl.rand(seed, offset), mask=in_range)


def philox_uniform(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """float32 ``tl.rand(seed, offset)`` for an int64 ``offset`` tensor (any shape)."""
    flat = offset.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    block = 256
    _uniform_kernel[(triton.cdiv(flat.numel(), block),)](out, flat, seed, flat.numel(), BLOCK=block)
    return out.reshape(offset.shape)
