"""Philox-4x32-10 uniform noise, bit-identical to Triton's ``tl.rand(seed, offset)``.

Every backend draws its randomness (attention dropout, Gumbel noise for sampling)
from this one definition, so a seed gives the same mask / the same sample on the
reference, Triton, CUDA and CPU backends, whatever their tile sizes.

Definition (what ``tl.rand`` computes, reproduced with int64 tensor arithmetic):

* key ``(k0, k1) = (seed & 0xffffffff, seed >> 32)`` for a 64-bit ``seed``;
* counter ``(c0, c1, c2, c3) = (offset & 0xffffffff, offset >> 32, 0, 0)`` for an
  int64 ``offset``;
* ten Philox-4x32 rounds; the first output word ``x`` is read as int32, folded
  to ``x' = x if x >= 0 else ~x`` and mapped to ``float32(x') * 4.6566127342e-10``,
  a float32 in ``[0, 1)``.

Offset layouts (one counter per random number, never reused within a call):

==========================  ================================================
use                          offset
==========================  ================================================
attention dropout, content   ``((b * H + h) * Lq + i) * Lk + j``
attention dropout, query     ``B*H*Lq*Lk + ((b * H + h) * P + p) * Lk + j``
Gumbel noise (sampling)      ``n * V + v`` (row n of the un-compacted input)
==========================  ================================================
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
# Triton's scale: the largest float with int32_max * scale < 1 in float32.
_UNIFORM_SCALE = 4.6566127342e-10
N_ROUNDS = 10
SEED_RANGE = 2**63


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and uint32 values held in int64.

    The 64-bit product can exceed int64: torch's integer multiply wraps modulo 2**64 (two's
    complement, on CPU and CUDA), which keeps all 64 bits; the known-answer test and the
    ``tl.rand`` comparison in tests/test_philox.py guard that assumption.
    """
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox_uint32(seed, offset: torch.Tensor, n_rounds: int = N_ROUNDS) -> torch.Tensor:
    """First output word of Philox-4x32 for key ``seed`` (an int, or a one-element int64 tensor, see
    :func:`draw_seed`) and counter ``offset``, as int64 in [0, 2**32)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.reshape(()).to(torch.int64)
    else:
        seed = int(seed)
        if not 0 <= seed < SEED_RANGE:
            raise ValueError(f"seed must be an int in [0, 2**63), got {seed}")
    offset = offset.to(torch.int64)
    c0 = offset & _MASK32
    c1 = (offset >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def philox_uniform(seed, offset: torch.Tensor, n_rounds: int = N_ROUNDS) -> torch.Tensor:
    """float32 uniforms in [0, 1) equal bit for bit to ``tl.rand(seed, offset)``; same shape as ``offset``."""
    x = philox_uint32(seed, offset, n_rounds)
    signed = torch.where(x >= 2**31, x - 2**32, x)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def draw_seed():
    """A seed from torch's default generator, so ``torch.manual_seed`` makes calls without ``seed`` reproducible.

    An int; while torch.compile traces, the same draw as a one-element int64 CPU tensor in the graph
    (an int would need ``.item()``: a graph break, and a seed frozen into the compiled code). Every op
    takes either form; the kernels read the tensor's value on the host, which never waits for a device.
    """
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
    if torch.compiler.is_compiling():
        return seed.reshape(())
    return int(seed.item())


def seed_value(seed) -> int:
    """The int behind a seed; the ops' seed tensors live on the CPU, so this never waits for a device."""
    return int(seed)


def seed_tensor(seed):
    """The registered ops' form of a seed: a 0-dim int64 CPU tensor (``None`` stays ``None``)."""
    if seed is None or isinstance(seed, torch.Tensor):
        return seed
    return torch.tensor(seed, dtype=torch.int64)
