"""pyobjectives benchmark suite: ``python -m benchmarks.run`` (see ``benchmarks/README.md``).

One module per op (:mod:`benchmarks.attention`, :mod:`benchmarks.rtd`,
:mod:`benchmarks.lce`) plus end-to-end training steps (:mod:`benchmarks.e2e`);
:mod:`benchmarks.common` holds the timing, memory, correctness and roofline
machinery they share, :mod:`benchmarks.report` the JSON / CSV / PNG / markdown
output and ``--compare``.
"""
