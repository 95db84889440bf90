"""`dlip bench`: model size and compute (`size`), latency and throughput (`latency`).

Both build a JSON record that names the machine it ran on (`dlip.fileio.machine`); the command
(`dlip.cli.bench`) writes it under an output directory (default benchmarks/results/), and
benchmarks/report.py renders docs/benchmarks.md from those files. The counting primitives live
in `dlip.models.counting`. May import: inference and everything below it.
"""
