"""`python -m dlip ...` (also what torchrun launches: `torchrun ... -m dlip pretrain ...`)."""

import sys

from dlip.cli import main

sys.exit(main())
