"""Sub-commands (see docs/ARCHITECTURE.md for who owns what)."""

from __future__ import annotations

import click


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
