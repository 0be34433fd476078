"""Two-stream relative attention (XLNet), fwd+bwd, on every provider: ``pytest benchmarks/test_attention.py``.

Inputs, FLOP / byte formulas and providers: :mod:`benchmarks.attention`; parametrization, check and timing:
``benchmarks/conftest.py``.
"""

from benchmarks import attention

OPS = [attention]


def test_attention(bench, bench_param):
    bench.run(bench_param)
