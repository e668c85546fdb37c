"""Collect activations: `uv run collect.py --config configs/demo.toml [--flag value ...]`."""

from saesweep.collect.cli import main

if __name__ == "__main__":
    main()
