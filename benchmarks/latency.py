"""Latency teacher vs students: the same as `dlip bench latency`.

    python benchmarks/latency.py [--models blip_base,dlip_base,dlip_small,dlip_tiny]
        [--device cpu|cuda] [--threads 1] [--out-dir benchmarks/results]

Kept so older instructions still work; the logic lives in `dlip.benchmarks.latency`.
"""

from __future__ import annotations

import sys

from dlip.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "latency", *sys.argv[1:]]))
