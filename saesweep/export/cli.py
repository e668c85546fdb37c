"""export.py: the first word names the format, the rest is that format's command line."""

from __future__ import annotations

import importlib
import sys

from saesweep.configtools import closest, parse_command
from saesweep.errors import UserError, exit_on_user_error
from saesweep.export import FORMATS

FORMAT_MODULES: tuple[str, ...] = (
    "circuit_tracer",
    "delphi",
    "neuronpedia",
    "saelens_cache",
    "sparsify",
)
"""The modules of saesweep.export that register a format (imported on first use)."""
PROGRAM = "uv run export.py"


def formats() -> dict:
    for module in FORMAT_MODULES:
        importlib.import_module(f"saesweep.export.{module}")
    return FORMATS


def usage() -> str:
    lines = [f"usage: {PROGRAM} FORMAT RUN_OR_SWEEP_DIR... [flags]  (FORMAT -h for its flags)", ""]
    lines += [f"  {name:<16} {fmt.summary}" for name, fmt in sorted(formats().items())]
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    known = formats()
    if not args:
        raise UserError(f"{PROGRAM} needs a FORMAT ({', '.join(sorted(known))}); see {PROGRAM} -h")
    if args[0] in ("-h", "--help"):
        print(usage(), end="")
        raise SystemExit(0)
    name, rest = args[0], args[1:]
    if name not in known:
        raise UserError(f"unknown export format {name!r}{closest(name, known)}; see {PROGRAM} -h")
    fmt = known[name]
    program = f"{PROGRAM} {name}"
    usage_line = f"usage: {program} {fmt.arguments} [flags]\n"
    fmt.write(parse_command(rest, fmt.command, program, usage_line))
