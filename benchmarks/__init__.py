"""fimfast's benchmark suite: time, memory and accuracy of diagonal-Fisher estimators.

``python -m benchmarks --help``; the protocol is in :mod:`benchmarks.suite`, the workloads in
:mod:`benchmarks.workloads`, the methods in :mod:`benchmarks.methods`.
"""
