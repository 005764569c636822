"""The benchmark's measurement library: workloads, timing/memory, methods, report.

Imports no Ray. `jobs/benchmark.py` wires it: config, load data, build model, run
methods, write JSON/plots, print table.
"""
