"""End-to-end training steps (fwd + bwd + AdamW): HF XLNet and T5 patched vs unpatched, the ELECTRA
objective fused vs eager: ``pytest benchmarks/test_e2e.py``.

Models, batches, checks and providers: :mod:`benchmarks.e2e`; parametrization, check and timing:
``benchmarks/conftest.py``.
"""

from benchmarks.e2e import ElectraStep, XLNetStep
from benchmarks.t5 import T5Step

OPS = [XLNetStep, ElectraStep, T5Step]


def test_step(bench, bench_param):
    bench.run(bench_param)
