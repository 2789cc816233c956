"""``escort check``: fleet health for cron and monitoring (docs/CHECK.md).

Exit 0: nothing found. Exit 1: findings (an unreachable host is a finding, never a
crash). Exit 2: unusable input (the fleet file).
"""

from __future__ import annotations

import asyncio
import json

import click

from console.cli.fleet_cmds import _fleet_path


@click.command("check")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.option("--json", "as_json", is_flag=True,
              help='One JSON document: {"findings": [{"code", "severity", "vm"?, "host"?, "message", '
                   '"fix"}], "checked_at"}.')
@click.option("--offline", is_flag=True,
              help="Contact no host: check the fleet file's VMs and certificates only (no guard state).")
@click.option("--days", type=click.IntRange(0, 3650), default=14, show_default=True,
              help="Report everything that expires within this many days, with what it breaks.")
@click.pass_context
def check(ctx: click.Context, fleet: str | None, as_json: bool, offline: bool, days: int) -> None:
    """Find what is wrong with the fleet now and what breaks within DAYS.

    Placement violations (a VM on a host its policy refuses, with every reason),
    hosts without a current guard, half-done migrations, unreachable hosts, and every
    certificate, CRL, policy and grant that expires soon, with its impact.
    """
    from console.services.check import CheckService
    from console.services.fleet import FleetService

    service = FleetService.load_strict(_fleet_path(ctx, fleet))
    report = asyncio.run(CheckService(service, days=days, offline=offline).run())
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        where = "offline (fleet file only)" if offline else "live"
        click.echo(f"escort check {service.name}: {report.hosts} host(s), {report.vms} VM(s), {where}, "
                   f"expiry horizon {days} day(s)")
        if not report.findings:
            click.echo("✓ nothing found")
        for f in report.findings:
            mark = "✗" if f.severity == "error" else "!"
            click.echo(f"{mark} {f.code}: {f.message}")
            for r in f.reasons[1:] if f.code == "placement.violation" else ():
                click.echo(f"    also {r.code}: {r.message}")
            if f.fix:
                click.echo(f"    fix: {f.fix}")
    ctx.exit(1 if report.findings else 0)


def register(group: click.Group) -> None:
    group.add_command(check)
