"""``escort`` (no sub-command) and ``escort demo``: open the console."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import click

from console.core.errors import InputError


def _parse_at(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise InputError(f"--at {text!r} is not an RFC 3339 time (e.g. 2026-11-26T12:00:00Z)") from exc
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def open_console(fleet_file: str | None, *, readonly: bool, at: dt.datetime | None = None,
                 admin: str | None = None, problems: list[str] | None = None) -> None:
    """Load the fleet (problems are shown in the console, never raised) and run the UI."""
    from console.services.fleet import FleetService
    from console.ui.app import EscortApp
    from console.ui.config import load_config

    if fleet_file is None:
        fleet_file = os.environ.get("ESCORT_FLEET") or None
    if fleet_file is None:
        raise InputError("no fleet file: try `escort demo`, or `escort --fleet FILE` "
                         "(or set ESCORT_FLEET)")
    config, config_problems = load_config()
    service = FleetService.load(fleet_file, readonly=readonly or config.readonly, at=at)
    app = EscortApp(service, config=config, at=at, admin=admin,
                    problems=[*config_problems, *(problems or [])])
    app.run()


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""

    @group.command("demo")
    @click.option("--regenerate", is_flag=True, help="Throw the demo fleet away and make a new one.")
    @click.option("--readonly", is_flag=True, help="Disable every action that changes anything.")
    @click.option("--dir", "directory", type=click.Path(file_okay=False), default=None,
                  help="Where the demo fleet lives (default: the user data dir).")
    @click.option("--at", "at_text", default=None, help="Judge certificates at this RFC 3339 time.")
    @click.option("--print-path", is_flag=True, help="Only (re)generate and print the fleet file path.")
    @click.option("--admin", default=None,
                  help="Decide as this admin (their grants count), e.g. oncall or night-shift.")
    @click.option("--lab", is_flag=True,
                  help="Root only: start (or reuse) the real lab of namespaced libvirt/QEMU hosts "
                       "and open the console on it instead.")
    @click.option("--lab-name", default="demo", show_default=True, help="Which lab (with --lab).")
    def demo(regenerate: bool, readonly: bool, directory: str | None, at_text: str | None,
             print_path: bool, admin: str | None, lab: bool, lab_name: str) -> None:
        """Open the console on a generated demo fleet (libvirt test driver; nothing really moves).

        The fleet is generated on first use into the user data directory and reused
        afterwards; it is regenerated when older than 5 days so its dates stay meaningful.
        """
        from console.demo import demo_dir, ensure_demo

        at = _parse_at(at_text)
        if lab:
            from console.lab import Lab, require_root

            require_root()  # one line, exit 2, when not root
            the_lab = Lab(name=lab_name)
            result = the_lab.up()  # idempotent: an existing lab is reused
            if print_path:
                click.echo(str(the_lab.fleet_file))
                return
            if not result.already:
                click.echo(f"escort: lab {the_lab.name!r} up in {result.seconds:.1f} s "
                           f"({the_lab.dir}); `escort lab down` stops it", err=True)
            open_console(str(the_lab.fleet_file), readonly=readonly, at=at, admin=admin)
            return
        dest = Path(directory) if directory else demo_dir()
        fleet, made = ensure_demo(dest, regenerate=regenerate, at=at)
        if print_path:
            click.echo(str(fleet))
            return
        if made:
            click.echo(f"escort: generated the demo fleet in {fleet.parent}", err=True)
        open_console(str(fleet), readonly=readonly, at=at, admin=admin)
