"""Benchmarks of the SLIM op against unfused baselines: ``slim-kernels bench``.

Modules (importing this package imports nothing else, so the command's ``--help`` is fast):

* :mod:`.cases`      what one benchmark point is (:class:`~.cases.Case`), the sweeps, the
                     modes and provider names, the random inputs every provider shares.
* :mod:`.providers`  the implementations timed side by side, and the fp64 truth of each.
* :mod:`.measuring`  the one timing harness (interleaved repetitions, wall and process CPU
                     time), memory, quantiles, the FLOP floor, and :func:`~.measuring.run_bench`.
* :mod:`.reporting`  the CSV (with the provenance of the run), ratio tables, the plot.
* :mod:`.command`    the command's arguments, their checks, and the run.

Used by ``slim-kernels bench``, ``benchmarks/run_bench.py``, ``benchmarks/plot.py``,
``benchmarks/cpu_backend_ratio.py`` and ``tests/test_bench_entries.py``.
"""
