"""Export trained runs for other tools: `uv run export.py FORMAT RUN_OR_SWEEP_DIR... --out DIR`."""

from saesweep.export.cli import main

if __name__ == "__main__":
    main()
