"""End-to-end training steps (fwd + bwd + AdamW): HF XLNet patched vs unpatched, the ELECTRA objective fused
vs eager: ``pytest benchmarks/test_e2e.py``.

Models, batches, checks and providers: :mod:`benchmarks.e2e`; parametrization, check and timing:
``benchmarks/conftest.py``.
"""

from benchmarks.e2e import ElectraStep, XLNetStep

OPS = [XLNetStep, ElectraStep]


def test_step(bench, bench_param):
    bench.run(bench_param)
