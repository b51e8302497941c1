"""The measuring wing: how bpjax times itself, apart from what it computes.

The rule: nothing outside ``bpjax/bench/`` imports this package, except the
benchmark scripts in ``experiments/``, the tests and the notebook. The library
(network, formulas, methods, training) never depends on its own measuring
instrument; ``tests/test_bench_layout.py`` checks that no ``bpjax/*.py`` module
outside this folder imports it.

One job per module, each importing only the ones above it:

* ``timing``: the protocol every number goes through (AOT compile apart,
  ``block_until_ready``, interleaved rounds in random order, medians, a
  process-wide compile counter) and where the numbers were measured;
* ``steps``: what is timed: the training loop's SGD step, its FLOPs, the
  GEMM-only roofline, the square-matmul peak;
* ``peers``: the outside references: the first document's NumPy code and
  PyTorch autograd;
* ``report``: measured records in, rows with derived columns out; the table,
  JSON, CSV and PNG;
* ``measure``: one batch size of the sweep: compile every method's step, time
  them interleaved, one record each;
* ``sweep``: ``SweepConfig`` and ``run_sweep``, the batch-size sweep over
  methods, platforms and device counts, one process per configuration where
  peak memory is wanted;
* ``study``: the batch-size *training* study's pieces (learning-rate grids,
  steps to target, the S_min / E_min / B_crit fit, its plots), run by
  ``experiments/batch_study.py``.

Importing the package imports none of them.
"""
