"""Exports of trained runs in the formats other tools read, one module per format.

A format module registers itself with `export_format(name, command)`: `command` is a frozen
dataclass (its fields are the format's flags and positional arguments, their docstrings its
--help) and the decorated function writes the export from a parsed command. export.py's
first word picks the format (saesweep.export.cli).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExportFormat:
    name: str
    command: type
    """The format's command: a frozen dataclass parsed by configtools.parse_command."""
    write: Callable[[Any], None]
    """Writes the export described by a parsed command."""
    arguments: str = "RUN_OR_SWEEP_DIR..."
    """The positional arguments as its usage line shows them."""

    @property
    def summary(self) -> str:
        """The first sentence of the command's docstring: the format's line in export.py -h."""
        return " ".join((self.command.__doc__ or "").split()).split(". ")[0].rstrip(".")


FORMATS: dict[str, ExportFormat] = {}


def export_format(name: str, command: type, arguments: str = "RUN_OR_SWEEP_DIR...") -> Callable:
    """Register the decorated function as the writer of format `name`, whose positional
    arguments its usage line shows as `arguments`."""

    def register(write: Callable[[Any], None]) -> Callable[[Any], None]:
        FORMATS[name] = ExportFormat(name, command, write, arguments)
        return write

    return register
