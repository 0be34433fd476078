"""The shared RNG: the reference Philox equals Triton's tl.rand bit for bit, and Random123's known answer."""

import pytest
import torch

from pyobjectives.reference.philox import philox_uint32, philox_uniform


def test_known_answer_random123():
    # Random123 kat_vectors: philox4x32, 10 rounds, counter 0 and key 0 -> first word 0x6627e8d5
    assert philox_uint32(0, torch.tensor([0])).item() == 0x6627E8D5


def test_uniform_range_and_mean():
    u = philox_uniform(5, torch.arange(100000))
    assert u.dtype == torch.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.005


@pytest.mark.parametrize("seed", [0, 1, 123456789012, 2**32 + 5, 2**63 - 1])
def test_reference_equals_tl_rand(seed, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    from pyobjectives.kernels.philox import philox_uniform as triton_uniform
    offsets = torch.cat([torch.arange(0, 2000), torch.randint(0, 2**62, (2000,)),
                         torch.tensor([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40 + 17])])
    assert torch.equal(philox_uniform(seed, offsets), triton_uniform(seed, offsets))


def test_seed_range_checked():
    with pytest.raises(ValueError, match="seed must be an int in"):
        philox_uniform(-1, torch.arange(3))
