"""``escort emergency declare|list``: when emergency-only grants may count (services/emergency.py).

``declare`` is a changing action: read-only mode refuses it (exit 3) and the operator
first proves the acting admin's SSH key (exit 1 when not). The declaration, signed
with that key, goes into the fleet's audit log and is shown by the console until it
ends. ``list`` prints the emergencies in force (exit 0; ``--json``: a list of
``{"host", "reason", "admin", "from", "until"}``).
"""

from __future__ import annotations

import asyncio
import json

import click

from console.cli.fleet_cmds import _fleet_path
from console.services.emergency import DEFAULT_HOURS, MAX_HOURS, audit_path, declare, declared
from console.services.fleet import FleetService


@click.group("emergency")
def emergency() -> None:
    """Declared emergencies: the only time emergency-only grants count (besides a host down)."""


@emergency.command("declare")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.argument("host")
@click.option("--reason", required=True, help="Why (recorded in the audit log, shown in the console).")
@click.option("--hours", type=click.FloatRange(0, MAX_HOURS, min_open=True), default=DEFAULT_HOURS,
              show_default=True, help="How long the emergency lasts.")
@click.option("--admin", default=None, metavar="ID",
              help="The admin declaring it (default: the one admin whose key is present).")
@click.option("--admin-key", "admin_key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The admin's private SSH key (besides the SSH agent and the fleet's identity_files).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def declare_cmd(ctx: click.Context, fleet: str | None, host: str, reason: str, hours: float,
                admin: str | None, admin_key: str | None, as_json: bool) -> None:
    """Declare an emergency for HOST: emergency-only grants then count for moves off it."""
    from console.adapters.audit import AuditLog
    from console.services.identity import AdminIdentity, terminal_prompt

    readonly = bool(ctx.find_root().params.get("readonly"))
    service = FleetService.load_strict(_fleet_path(ctx, fleet), readonly=readonly)
    service.require_writable("declare an emergency")
    identity = AdminIdentity(service, admin_key=admin_key, passphrase=terminal_prompt())
    audit = AuditLog(audit_path(service))
    try:
        em, _proof = asyncio.run(declare(service, host, reason, hours=hours, admin=admin, identity=identity,
                                         audit=audit))
    finally:
        audit.close()
    if as_json:
        click.echo(json.dumps(em.as_json(), sort_keys=True))
    else:
        click.echo(f"declared: {em.line()}; audit: {audit.path}")


@emergency.command("list")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def list_cmd(ctx: click.Context, fleet: str | None, as_json: bool) -> None:
    """Emergencies in force now (declarations whose signature verifies with an admin's key)."""
    service = FleetService.load_strict(_fleet_path(ctx, fleet))
    found = declared(service, audit_path(service))
    if as_json:
        click.echo(json.dumps([e.as_json() for e in found.values()], sort_keys=True))
    elif not found:
        click.echo("no emergency declared")
    else:
        for em in found.values():
            click.echo(em.line())


def register(group: click.Group) -> None:
    group.add_command(emergency)
