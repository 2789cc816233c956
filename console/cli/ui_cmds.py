"""``escort`` (no sub-command) and ``escort demo``: open the console."""

from __future__ import annotations

import click

from console.core.errors import EscortError


def open_console(fleet_file: str | None, *, readonly: bool) -> None:
    raise EscortError("the console is not built yet")


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
