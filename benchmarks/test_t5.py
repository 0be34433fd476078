"""T5 self-attention with the bucketed bias, fwd+bwd (gradient to the table), on every provider:
``pytest benchmarks/test_t5.py``.

Inputs, FLOP / byte formulas and providers: :mod:`benchmarks.t5`; parametrization, check and timing:
``benchmarks/conftest.py``.
"""

from benchmarks.t5 import T5Attention

OPS = [T5Attention]


def test_t5_attention(bench, bench_param):
    bench.run(bench_param)
