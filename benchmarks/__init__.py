"""pyobjectives benchmark suite: pytest-benchmark tests (``pytest benchmarks``; ``python -m benchmarks.run``
adds the report). See ``benchmarks/README.md``.

One module per op (:mod:`benchmarks.attention`, :mod:`benchmarks.rtd`, :mod:`benchmarks.lce`) plus end-to-end
training steps (:mod:`benchmarks.e2e`) build the inputs, providers and oracles; :mod:`benchmarks.suite` lists
configurations and test ids; ``benchmarks/conftest.py`` checks and times through the ``benchmark`` fixture;
:mod:`benchmarks.common` holds the correctness, memory and roofline machinery; :mod:`benchmarks.memory` the
per-process CPU peak memory; :mod:`benchmarks.report` the markdown / CSV / PNG report of a run's JSON.
"""
