"""ELECTRA RTD loss, fwd+bwd, on every provider: ``pytest benchmarks/test_rtd.py``.

Inputs, FLOP / byte formulas and providers: :mod:`benchmarks.rtd`; parametrization, check and timing:
``benchmarks/conftest.py``.
"""

from benchmarks import rtd

OPS = [rtd]


def test_rtd(bench, bench_param):
    bench.run(bench_param)
