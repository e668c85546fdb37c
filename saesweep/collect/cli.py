"""Entry point of collect.py."""

from __future__ import annotations

from saesweep.collect.config import parse_cli
from saesweep.collect.run import collect
from saesweep.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    cfg = parse_cli(argv)
    collect(cfg)
