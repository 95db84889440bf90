"""`dlip bench`: model size and compute (`size`), latency and throughput (`latency`).

Both write a JSON record under an output directory (default benchmarks/results/) that names
the machine it ran on (`dlip.bench.machine`); benchmarks/report.py renders docs/benchmarks.md
from those files. The counting primitives live in `dlip.bench`.
"""
