"""``escort hosts refresh`` and ``escort hosts trust``: the fleet's hosts, live.

``refresh`` reaches every host over SSH (through jump hosts), reads libvirt and the
migration certificate there, and prints one line per host; a host that cannot be
reached shows why on its own line and never blocks the others. Exit 0 when every
host reached answered, 1 when some did not, 2 for unusable input.

``trust`` is the deliberate way to accept an unknown host key: the operator reads
the fingerprint on the host's console and types it; only a key with exactly that
fingerprint is added. A *changed* key is never replaced here.
"""

from __future__ import annotations

import asyncio
import json

import click

from console.cli.fleet_cmds import _fleet_path
from console.core.errors import InputError
from console.services.fleet import FleetService
from console.services.guard import GuardService, GuardState
from console.services.inventory import InventoryService, refresh_fleet


def _host_rows(service: FleetService) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    counts: dict[str, int] = {}
    for vm in service.vms():
        counts[vm.host] = counts.get(vm.host, 0) + 1
    for host in service.hosts():
        chain = host.chain
        rows.append({
            "host": host.name,
            "region": host.spec.region,
            "reachable": host.reachability,
            "problem": host.problem.as_json() if host.problem else None,
            "cert_valid": None if chain is None else chain.valid,
            "cert_reasons": [r.as_json() for r in chain.reasons] if chain else [],
            "cert_problem": host.cert_problem.as_json() if host.cert_problem else None,
            "vms": counts.get(host.name, 0),
            "free_memory_mib": host.facts.free_memory_mib if host.facts else None,
        })
    return rows


@click.group("hosts")
def hosts() -> None:
    """The fleet's hosts, reached over SSH."""


@hosts.command("refresh")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document with every host.")
@click.pass_context
def refresh(ctx: click.Context, fleet: str | None, as_json: bool) -> None:
    """Reach every host now and show reachability, certificate and VM count."""
    service = FleetService.load_strict(_fleet_path(ctx, fleet))
    asyncio.run(refresh_fleet(service))
    rows = _host_rows(service)
    if as_json:
        click.echo(json.dumps({"fleet": service.name, "kind": service.kind, "hosts": rows}, indent=2))
    else:
        for row in rows:
            if row["reachable"] == "up":
                cert = {True: "certificate ok", False: "certificate REFUSED", None: "no certificate"}[
                    row["cert_valid"]]  # type: ignore[index]
                line = f"✓ {row['host']:<14} up    {cert}, {row['vms']} VM(s)"
                if row["cert_valid"] is False:
                    first = row["cert_reasons"][0]  # type: ignore[index]
                    line += f" — {first['message']}"
            elif row["reachable"] == "unknown":
                line = f"- {row['host']:<14} not reached (no ssh or libvirt URI in the fleet file)"
            else:
                problem = row["problem"] or {"message": "no answer"}
                line = f"✗ {row['host']:<14} down  {problem['message']}"  # type: ignore[index]
            click.echo(line)
    ctx.exit(1 if any(r["reachable"] == "down" for r in rows) else 0)


@hosts.command("trust")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.option("--admin", default=None, metavar="ID",
              help="The admin acting (default: the one whose key is here).")
@click.option("--admin-key", "admin_key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The admin's private SSH key (besides the SSH agent and the fleet's identity_files).")
@click.argument("host")
@click.argument("fingerprint")
@click.pass_context
def trust(ctx: click.Context, fleet: str | None, admin: str | None, admin_key: str | None, host: str,
          fingerprint: str) -> None:
    """Accept HOST's SSH key if (and only if) it has FINGERPRINT (SHA256:...).

    HOST is a fleet host or a jump host on the way to one (as the fleet or ssh_config
    names it, e.g. root@10.0.0.1, or its address). Read the fingerprint on the host itself
    (``ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub``) and type it here; escort adds
    the host's plain key to the fleet's known_hosts file (also for a host that presents a
    certificate escort could not verify, as OpenSSH offers).
    """
    if not fingerprint.startswith("SHA256:"):
        raise InputError(f"{fingerprint!r} is not an SSH fingerprint (expected SHA256:...)")
    from console.services.identity import AdminIdentity, terminal_prompt
    from console.services.inventory import trust_host_key

    readonly = bool(ctx.find_root().params.get("readonly"))
    service = FleetService.load_strict(_fleet_path(ctx, fleet), readonly=readonly)
    inventory = InventoryService.for_fleet(service)
    identity = AdminIdentity(service, admin_key=admin_key, passphrase=terminal_prompt())
    inventory.trust_target(host)  # an unknown name is unusable input (exit 2), before any connect

    async def go() -> str:
        try:
            return await trust_host_key(service, inventory, host, fingerprint, admin=admin, identity=identity)
        finally:
            await inventory.close()

    line = asyncio.run(go())
    click.echo(f"{host}: key already trusted" if not line else f"{host}: added to known_hosts: {line}")


@hosts.group("guard")
def guard() -> None:
    """The escort guard: a libvirt hook on each hypervisor that enforces the owners' policies."""


def _guard_service(ctx: click.Context, fleet: str | None) -> tuple[FleetService, GuardService]:
    service = FleetService.load_strict(_fleet_path(ctx, fleet))
    return service, GuardService(service)


def _short(digest: str) -> str:
    return f"sha256:{digest[:16]}" if digest else "-"


@guard.command("install")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.option("--restart", is_flag=True, help="Restart libvirtd even when it already knows the hook.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document with every host.")
@click.option("--admin", default=None, metavar="ID",
              help="The admin acting (default: the one whose key is here).")
@click.option("--admin-key", "admin_key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The admin's private SSH key (besides the SSH agent and the fleet's identity_files).")
@click.argument("names", nargs=-1)
@click.pass_context
def guard_install(ctx: click.Context, fleet: str | None, restart: bool, as_json: bool, admin: str | None,
                  admin_key: str | None, names: tuple[str, ...]) -> None:
    """Push the guard (code bundle + trust material) to HOSTs (default: all); idempotent.

    Hosts are refreshed first, so the guard learns every VM that carries a policy (a
    VM arriving without it is then refused as stripped). libvirtd is restarted only
    when it started before the hook existed; running guests are not affected.
    """
    from console.services.identity import AdminIdentity, terminal_prompt

    service, guards = _guard_service(ctx, fleet)
    service.require_writable("install the host guard")
    identity = AdminIdentity(service, admin_key=admin_key, passphrase=terminal_prompt())

    async def go() -> list[dict[str, object]]:
        try:
            await guards.inventory.refresh()
            return await guards.install(names, restart=restart, admin=admin, identity=identity)
        finally:
            await guards.inventory.close()

    rows = asyncio.run(go())
    if as_json:
        click.echo(json.dumps({"fleet": service.name, "hosts": rows}, indent=2))
    else:
        for r in rows:
            if r.get("ok"):
                steps = ", ".join(r.get("steps", [])) or "nothing changed"  # type: ignore[arg-type]
                extra = f"; {r['restart']}" if r.get("restart") else ""
                click.echo(f"✓ {r['host']:<14} guard installed ({steps}{extra}), "
                           f"trust {_short(str(r.get('trust_digest', '')))}")
            else:
                click.echo(f"✗ {r['host']:<14} {r.get('problem')}")
    ctx.exit(0 if all(r.get("ok") for r in rows) else 1)


@guard.command("status")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.option("--offline", is_flag=True, help="Compare with the fleet file's VMs only (no refresh first).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document with every host.")
@click.argument("names", nargs=-1)
@click.pass_context
def guard_status(ctx: click.Context, fleet: str | None, offline: bool, as_json: bool,
                 names: tuple[str, ...]) -> None:
    """Guard version and trust-material digest per host: current, stale, missing or broken.

    Exit 0 when every host's guard is current, 1 otherwise (an unreachable host too).
    """
    service, guards = _guard_service(ctx, fleet)

    async def go() -> list[GuardState]:
        try:
            if not offline:
                await guards.inventory.refresh()
            return await guards.status(names)
        finally:
            await guards.inventory.close()

    states = asyncio.run(go())
    if as_json:
        click.echo(json.dumps({"fleet": service.name, "hosts": [s.as_json() for s in states]}, indent=2))
    else:
        marks = {"current": "✓", "stale": "!", "missing": "✗", "broken": "✗", "unreachable": "?",
                 "not-live": "-"}
        for s in states:
            line = f"{marks.get(s.state, '?')} {s.host:<14} {s.state:<11}"
            if s.version:
                line += f" version {s.version}, trust {_short(s.trust_digest)}"
            if s.problem:
                line += f" — {s.problem}"
            click.echo(line)
    ctx.exit(0 if all(s.state == "current" for s in states) else 1)


@guard.command("remove")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.option("--json", "as_json", is_flag=True, help="One JSON document with every host.")
@click.option("--admin", default=None, metavar="ID",
              help="The admin acting (default: the one whose key is here).")
@click.option("--admin-key", "admin_key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The admin's private SSH key (besides the SSH agent and the fleet's identity_files).")
@click.argument("names", nargs=-1)
@click.pass_context
def guard_remove(ctx: click.Context, fleet: str | None, as_json: bool, admin: str | None,
                 admin_key: str | None, names: tuple[str, ...]) -> None:
    """Remove the guard (hook, trust material, code) from HOSTs (default: all)."""
    from console.services.identity import AdminIdentity, terminal_prompt

    service, guards = _guard_service(ctx, fleet)
    service.require_writable("remove the host guard")
    identity = AdminIdentity(service, admin_key=admin_key, passphrase=terminal_prompt())

    async def go() -> list[dict[str, object]]:
        try:
            return await guards.remove(names, admin=admin, identity=identity)
        finally:
            await guards.inventory.close()

    rows = asyncio.run(go())
    if as_json:
        click.echo(json.dumps({"fleet": service.name, "hosts": rows}, indent=2))
    else:
        for r in rows:
            if r.get("ok"):
                click.echo(f"✓ {r['host']:<14} guard removed" if r.get("removed") else
                           f"- {r['host']:<14} no guard was installed")
            else:
                click.echo(f"✗ {r['host']:<14} {r.get('problem')}")
    ctx.exit(0 if all(r.get("ok") for r in rows) else 1)


def register(group: click.Group) -> None:
    group.add_command(hosts)
