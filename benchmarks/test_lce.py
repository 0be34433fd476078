"""ELECTRA generator linear + cross-entropy (+ sampling), fwd+bwd, on every provider: ``pytest benchmarks/test_lce.py``.

Inputs, FLOP / byte formulas and providers: :mod:`benchmarks.lce`; parametrization, check and timing:
``benchmarks/conftest.py``.
"""

from benchmarks import lce

OPS = [lce]


def test_lce(bench, bench_param):
    bench.run(bench_param)
