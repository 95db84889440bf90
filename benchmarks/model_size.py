"""Parameters and FLOPs of the presets at 224 and 384 px: the same as `dlip bench size`.

    python benchmarks/model_size.py [--out-dir benchmarks/results]

Kept so older instructions still work; the logic lives in `dlip.benchmarks.size`.
"""

from __future__ import annotations

import sys

from dlip.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "size", *sys.argv[1:]]))
