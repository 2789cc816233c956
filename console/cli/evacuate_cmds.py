"""``escort evacuate`` and ``escort drain``: empty failing hosts (or a dying CA's hosts).

Both refresh every host live (over SSH, as ``escort hosts refresh`` does), print the
plan — moves, VMs that cannot move with the reasons per candidate host and the owner
to call — ask for confirmation (type the word ``evacuate``) unless ``--yes``, run the
moves in parallel through the migration service (pre-flight, TLS, watchdog, audit)
and print the summary, which also goes to the audit log.

Exit codes: 0 every VM moved (with ``--dry-run``: every VM has a target), 1 some VM did
not move or cannot, 2 unusable input, 3 read-only mode. ``--json`` prints JSON lines:
``{"event": "plan"|"vm"|"summary"|"demo"|"cancelled", ...}``. Ctrl-C aborts every move
in flight (each VM stays on its source) and prints the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import click

from console.cli.fleet_cmds import _fleet_path
from console.core.errors import InputError
from console.services.evacuation import (
    EvacuationEvent,
    EvacuationService,
    InventoryLocator,
    Limits,
    MigrationMover,
    PlannedEvacuation,
    RunFinished,
    VMUpdate,
)
from console.services.fleet import FleetService
from console.services.identity import AdminIdentity, terminal_prompt
from console.services.inventory import InventoryService

DEMO_NOTE = ("this is the demo fleet (libvirt's test driver): the plan above is real, but moving VMs "
             "needs real hosts — try `escort lab up` and the lab's fleet file")


def _emit(event: str, payload: dict[str, Any]) -> None:
    click.echo(json.dumps({"event": event, **payload}, sort_keys=True))


def _admin(fleet: FleetService, admin: str | None, *, required: bool) -> str | None:
    """--admin, else the fleet's only admin; required to run (grants are per admin)."""
    if admin:
        return admin
    if len(fleet.admins) == 1:
        return fleet.admins[0].id
    if required:
        raise InputError(f"name the admin with --admin (the fleet file lists {len(fleet.admins)} admins)"
                         if fleet.admins else "the fleet file lists no [[admins]]: moving VMs needs an "
                         "admin with a grant")
    return None


_MOVING = frozenset({"copying", "converging", "switchover"})


def _board_line(u: VMUpdate) -> str:
    pct = ""
    if u.progress is not None and u.progress.fraction is not None and u.phase in _MOVING:
        pct = f" {u.progress.fraction * 100:3.0f}%"
    where = f" (runs on {u.vm_on})" if u.done and u.vm_on else ""
    msg = f" — {u.message}" if u.message and u.phase in ("failed", "aborted") else ""
    return f"  {u.phase:<10}{pct} {u.name}: {u.source} -> {u.target}{where}{msg}"


async def _evacuate(ctx: click.Context, fleet_path: str, plan_fn: Callable[[EvacuationService],
                    PlannedEvacuation], *, admin: str | None, dry_run: bool, as_json: bool,
                    parallel: int | None, yes: bool, cpu_ratio: float, admin_key: str | None = None) -> int:
    from console.services.migration import MigrationService

    readonly = bool(ctx.find_root().params.get("readonly"))
    fleet = FleetService.load_strict(fleet_path, readonly=readonly, eager=True)
    limits = Limits.for_parallel(parallel)
    demo = fleet.kind == "demo"
    run_it = not dry_run and not demo
    inventory = InventoryService.for_fleet(fleet)
    migrations: MigrationService | None = None
    proof = None
    if run_it:
        fleet.require_writable("evacuation")
        # first: prove the acting admin's key (refused here, nothing has been asked of any host)
        migrations = MigrationService(fleet, inventory, identity=AdminIdentity(
            fleet, admin_key=admin_key, passphrase=terminal_prompt()))
        try:
            proof = await migrations.prove(admin, "evacuate" if ctx.info_name == "evacuate" else "drain")
        except BaseException:
            await migrations.close()
            await inventory.close()
            raise
        who: str | None = proof.admin
    else:
        who = _admin(fleet, admin, required=False)
    try:
        await inventory.refresh()
        down = [h for h in fleet.hosts() if h.reachability != "up"]
        if down and not as_json:
            for h in down:
                click.echo(f"! {h.name} did not answer: "
                           f"{h.problem.message if h.problem else 'no answer'}", err=True)
        from console.services.emergency import audit_path, declared

        ev = EvacuationService(fleet, admin=who, vcpu_ratio=cpu_ratio,
                               emergencies=declared(fleet, audit_path(fleet)))
        planned = plan_fn(ev)
        complete = not (planned.stuck or planned.held)
        if as_json:
            _emit("plan", planned.as_json())
        else:
            click.echo("\n".join(planned.lines()))
        if demo:
            if as_json:
                _emit("demo", {"moved": False, "message": DEMO_NOTE})
            else:
                click.echo(f"Not moving anything: {DEMO_NOTE}.")
            return 0 if dry_run and complete else 1
        if dry_run or not planned.moves:
            if not planned.moves and not dry_run and not as_json:
                click.echo("Nothing to move.")
            return 0 if complete else 1
        if not yes:
            if not sys.stdin.isatty():
                raise InputError("not on a terminal: pass --yes to confirm the evacuation")
            typed = click.prompt(f"Type 'evacuate' to move {len(planned.moves)} VM(s) now", default="",
                                 show_default=False)
            if typed.strip() != "evacuate":
                if as_json:
                    _emit("cancelled", {"message": "not confirmed; nothing changed"})
                else:
                    click.echo("Not confirmed; nothing changed.")
                return 1
        assert migrations is not None
        ev.mover = MigrationMover(migrations, proof)
        ev.locator = InventoryLocator(inventory, fleet)
        ev.audit = migrations.audit  # one AuditLog instance: both services append to the same chain
        last_shown: dict[str, tuple[str, int]] = {}

        def show(event: EvacuationEvent) -> None:
            if isinstance(event, RunFinished):
                return
            if as_json:
                _emit("vm", event.as_json())
                return
            # one line per phase change and per quarter of the current pass: several VMs
            # share the terminal, so no carriage-return progress bar
            p = event.progress
            quarter = int((p.fraction or 0.0) * 4) if p is not None and event.phase in _MOVING else 0
            if last_shown.get(event.uuid) != (event.phase, quarter):
                last_shown[event.uuid] = (event.phase, quarter)
                click.echo(_board_line(event))

        run = ev.start(planned, limits=limits, on_event=show)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, run.abort_all)
        try:
            summary = await run.run()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
        if as_json:
            _emit("summary", summary.as_json())
        else:
            click.echo("")
            click.echo(summary.text())
            click.echo(f"  audit: {migrations.audit.path} (head {migrations.audit.head[:16]}…)")
        return 0 if summary.all_moved else 1
    finally:
        if migrations is not None:
            await migrations.close()
        await inventory.close()


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


_common = [
    click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None,
                 help="Fleet file (TOML)."),
    click.option("--admin", default=None, help="Admin whose grants authorise the moves "
                 "(default: the fleet's only admin)."),
    click.option("--admin-key", "admin_key", type=click.Path(dir_okay=False), default=None,
                 help="The admin's private SSH key file (besides the SSH agent and identity_files)."),
    click.option("--dry-run", is_flag=True, help="Plan only; change nothing."),
    click.option("--json", "as_json", is_flag=True, help="JSON lines instead of text."),
    click.option("--parallel", type=int, default=None,
                 help="Moves at once in total (default 10: sshd's MaxStartups); per source at most 4, "
                      "per target at most 2."),
    click.option("--yes", is_flag=True, help="Do not ask for confirmation."),
    click.option("--cpu-ratio", type=float, default=1.0, show_default=True,
                 help="vCPU overcommit allowed on targets (1.0: a host's CPUs are its vCPU room)."),
]


def _with_common(fn: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_common):
        fn = option(fn)
    return fn


@click.command("evacuate")
@click.argument("hosts", nargs=-1, required=True)
@_with_common
@click.pass_context
def evacuate(ctx: click.Context, hosts: tuple[str, ...], fleet: str | None, admin: str | None,
             admin_key: str | None, dry_run: bool, as_json: bool, parallel: int | None, yes: bool,
             cpu_ratio: float) -> None:
    """Move every running VM off HOST(s) to hosts their owners allow, with room, in parallel."""
    code = _run(_evacuate(ctx, _fleet_path(ctx, fleet), lambda ev: ev.plan(hosts), admin=admin,
                          dry_run=dry_run, as_json=as_json, parallel=parallel, yes=yes, cpu_ratio=cpu_ratio,
                          admin_key=admin_key))
    ctx.exit(code)


@click.command("drain")
@click.option("--ca", "ca", required=True, help="The CA's name or SHA-256 fingerprint.")
@_with_common
@click.pass_context
def drain(ctx: click.Context, ca: str, fleet: str | None, admin: str | None, admin_key: str | None,
          dry_run: bool, as_json: bool, parallel: int | None, yes: bool, cpu_ratio: float) -> None:
    """Move every VM off the hosts certified under a revoked or expiring CA."""
    code = _run(_evacuate(ctx, _fleet_path(ctx, fleet), lambda ev: ev.plan_drain(ca), admin=admin,
                          dry_run=dry_run, as_json=as_json, parallel=parallel, yes=yes, cpu_ratio=cpu_ratio,
                          admin_key=admin_key))
    ctx.exit(code)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(evacuate)
    group.add_command(drain)
