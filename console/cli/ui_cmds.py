"""``escort`` (no sub-command) and ``escort demo``: open the console."""

from __future__ import annotations

import datetime as dt
import gc
import os
from pathlib import Path

import click

from console.core.errors import InputError


def _parse_at(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    from console.cli.attime import parse_time  # one --at parser (range-checked) for every command

    return parse_time(text)


def open_console(fleet_file: str | None, *, readonly: bool, at: dt.datetime | None = None,
                 admin: str | None = None, problems: list[str] | None = None,
                 offline: bool = False) -> None:
    """Load the fleet (problems are shown in the console, never raised) and run the UI.

    ``offline``: never contact a host (no refresh on start, ``r`` refuses); decisions
    come from the fleet file and local certificates only.
    """
    from console.services.fleet import FleetService
    from console.ui.config import load_config  # (no Textual: it is imported after the fork below)

    if fleet_file is None:
        fleet_file = os.environ.get("ESCORT_FLEET") or None
    if fleet_file is None:
        raise InputError("no fleet file: try `escort demo`, or `escort --fleet FILE` "
                         "(or set ESCORT_FLEET)")
    config, config_problems = load_config()
    # What is made from here to the console's start lives as long as it does (the loaded fleet,
    # Textual's modules, the app): no cyclic garbage collection meanwhile -- its passes found
    # nothing and one full pass alone was ~0.1 s of the console's CPU at 10,000 VMs -- and
    # all of it frozen for the collector afterwards (never walked again), as the console
    # freezes its views and rows.
    collecting = gc.isenabled()
    gc.disable()
    try:
        # lazy: the console paints rows first and checks the fleet in steps after (ui/app.py)
        service = FleetService.load(fleet_file, readonly=readonly or config.readonly, at=at, eager=False)
        service.use_cache = True  # verified results persist in the XDG cache dir (adapters/cache.py)
        service.start_prefetch()  # reading and signature checks on the other core, from now on
        # Textual only now: its import (~0.25 s of CPU here) runs while the helper already works
        # on the other core, instead of before the fork, when that core had nothing to do
        from console.ui.app import EscortApp

        app = EscortApp(service, config=config, at=at, admin=admin,
                        problems=[*config_problems, *(problems or [])], live=not offline)
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
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
    @click.option("--vms", type=click.IntRange(0, 100_000), default=None,
                  help="Generate an offline fleet of this many VMs instead (with --hosts); "
                       "e.g. --vms 10000 --hosts 1000.")
    @click.option("--hosts", type=click.IntRange(1, 10_000), default=None,
                  help="Hosts of the generated offline fleet (with --vms).")
    def demo(regenerate: bool, readonly: bool, directory: str | None, at_text: str | None,
             print_path: bool, admin: str | None, lab: bool, lab_name: str, vms: int | None,
             hosts: int | None) -> None:
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
        if vms is not None or hosts is not None:
            from console.demo_scale import ensure_scale, scale_dir

            if lab:
                raise InputError("--vms/--hosts make an offline fleet; they do not go with --lab")
            n_vms, n_hosts = (vms if vms is not None else 1000), (hosts if hosts is not None else 100)
            where = Path(directory) if directory else scale_dir(n_vms, n_hosts)
            fleet, made = ensure_scale(where, vms=n_vms, hosts=n_hosts, regenerate=regenerate,
                                       progress=lambda text: click.echo(f"escort: {text}", err=True))
            if print_path:
                click.echo(str(fleet))
                return
            if made:
                click.echo(f"escort: generated an offline fleet of {n_vms:,} VMs on {n_hosts:,} hosts "
                           f"in {fleet.parent}", err=True)
            open_console(str(fleet), readonly=readonly, at=at, admin=admin, offline=True)
            return
        dest = Path(directory) if directory else demo_dir()
        fleet, made = ensure_demo(dest, regenerate=regenerate, at=at)
        if print_path:
            click.echo(str(fleet))
            return
        if made:
            click.echo(f"escort: generated the demo fleet in {fleet.parent}", err=True)
        open_console(str(fleet), readonly=readonly, at=at, admin=admin)
