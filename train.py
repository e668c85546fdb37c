"""Train SAEs: `uv run train.py --sweep sweeps/demo.py [--slurm-acct A] [--CONFIG.FIELD VALUE]`."""

import sys

from saesweep.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
