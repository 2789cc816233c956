"""``escort migrate`` and ``escort audit verify``.

``migrate`` first proves that the operator holds the acting admin's SSH key
(services/identity.py): refused otherwise (exit 1, nothing asked of any host).
Exit codes: 0 migrated (and verified on the target), 1 refused or failed
(the VM's state is said), 2 unusable input, 3 read-only mode. Output is a checklist
and a progress line on a terminal, JSON lines otherwise (or with ``--json``): one
``{"event": "preflight"|"progress"|"outcome"|"refused"|"demo", ...}`` object per line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

import click

from console.core.errors import InputError


# -- audit ---------------------------------------------------------------------------------
@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log."""


@audit_group.command("verify")
@click.argument("log_file", type=click.Path(dir_okay=True))
@click.option("--head", "expect_head", default=None,
              help="The head hash recorded earlier: also detects entries cut off the end.")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None,
              help="Fleet file: each signature must be by the key its admin has there.")
@click.option("--copy", "copy", type=click.Path(dir_okay=False), default=None,
              help="An outside copy of the entries (journalctl -t escort -o cat): compared line by line.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def audit_verify(ctx: click.Context, log_file: str, expect_head: str | None, fleet: str | None,
                 copy: str | None, as_json: bool) -> None:
    """Check every link and every admin signature of LOG_FILE, and say who did what.

    Exit 0 intact, 1 tampered (which line, what), 2 unusable.
    """
    from console.adapters.audit import verify_file

    if expect_head is not None and (len(expect_head) != 64 or
                                    any(c not in "0123456789abcdef" for c in expect_head)):
        raise InputError("--head must be a 64-character lowercase SHA-256 hex value")
    admins: dict[str, str] | None = None
    fleet_path = fleet or ctx.find_root().params.get("fleet_file")
    if fleet_path:
        from console.adapters.fleetfile import load_fleet

        admins = {a.id: a.ssh_key_fingerprint for a in load_fleet(str(fleet_path)).admins}
    report = verify_file(log_file, expect_head=expect_head, admins=admins, copy=copy)
    if as_json:
        click.echo(json.dumps(report.as_json(), sort_keys=True))
    else:
        if report.ok:
            click.echo(f"ok: {report.entries} entries, chain intact, head {report.head}")
        else:
            click.echo(f"TAMPERED: {len(report.problems)} problem(s) in {report.entries} entries")
            for problem in report.problems:
                click.echo(f"  {problem}  [{problem.code}]")
        extra = report.extra
        if extra:
            bound = "against the fleet file's admins" if admins is not None else \
                "by the keys they name (pass --fleet to bind them to admins)"
            click.echo(f"signatures: entries up to seq {extra.get('signed_through', 0)} signed, "
                       f"checked {bound}")
            for admin, kinds in sorted(dict(extra.get("actions", {})).items()):
                click.echo(f"  {admin}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        for warning in report.warnings:
            click.echo(f"  note: {warning}  [{warning.code}]")
        if expect_head is None and copy is None:
            click.echo("  (no outside anchor: entries cut off the end since the last signature cannot be "
                       "seen; pass --head or --copy)")
    if not report.ok:
        raise click.exceptions.Exit(1)


# -- migrate -------------------------------------------------------------------------------
_MARK = {"ok": "[ok]  ", "fail": "[FAIL]", "skipped": "[ -- ]"}


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _clock(s: float | None) -> str:
    if s is None:
        return "--:--"
    s = max(0, int(s))
    return f"{s // 60:02d}:{s % 60:02d}"


def progress_line(p: Any) -> str:
    """One terminal line for a ``core.migration.Progress`` (also used by the UI's tests)."""
    if p.data_total is None:
        return f"{p.phase:<10} waiting for the destination…  {_clock(p.elapsed_s)}  {p.message}".rstrip()
    frac = p.fraction or 0.0
    bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
    return (f"{p.phase:<10} [{bar}] {frac * 100:3.0f}%  {_size(p.data_processed)} sent, "
            f"{_size(p.data_remaining)} left  {_size(p.rate_bps)}/s  dirty {_size(p.dirty_rate_bps)}/s  "
            f"pass {p.iteration}  {_clock(p.elapsed_s)} ETA {_clock(p.eta_s)}  {p.message}").rstrip()


def _print_preflight(pf: Any) -> None:
    click.echo(f"Pre-flight: {pf.vm} {pf.source} -> {pf.target} (admin {pf.admin})")
    for item in pf.items:
        detail = f" — {item.detail}" if item.detail and item.ok else ""
        click.echo(f"  {_MARK[item.status]} {item.title}{detail}")
        for r in item.reasons:
            tag = "warning " if r.severity == "warning" else ""
            click.echo(f"         {tag}{r.code}: {r.message}")
            if r.fix and r.severity == "error":
                click.echo(f"           fix: {r.fix}")
    if pf.plan is not None:
        plan = pf.plan
        click.echo(f"  plan: {plan.migration_uri}, TLS name {plan.tls_name}, flags "
                   f"{'|'.join(plan.flag_names())}, target cert sha256 {plan.cert_fingerprint[:16]}…")
    click.echo(f"  pre-flight took {pf.elapsed_s * 1000:.0f} ms")


def _emit(event: str, payload: dict[str, Any]) -> None:
    click.echo(json.dumps({"event": event, **payload}, sort_keys=True))


async def _migrate(fleet_path: str, vm: str, host: str, admin: str | None, yes: bool, json_out: bool,
                   readonly: bool, bandwidth: int, stall: float | None, admin_key: str | None = None,
                   channels: int | None = None) -> int:
    from console.services.fleet import FleetService
    from console.services.identity import AdminIdentity, terminal_prompt
    from console.services.inventory import InventoryService
    from console.services.migration import DEMO_EXPLANATION, MigrationRefused, MigrationService

    fleet = FleetService.load_strict(fleet_path, readonly=readonly)
    fleet.require_writable("migration")
    assert fleet.spec is not None
    inventory = InventoryService(fleet.spec, apply=fleet.apply_facts)
    identity = AdminIdentity(fleet, admin_key=admin_key, passphrase=terminal_prompt())
    service = MigrationService(fleet, inventory, bandwidth_mib_s=bandwidth, stall_timeout_s=stall,
                               identity=identity, channels=channels)
    tty = sys.stdout.isatty() and not json_out
    try:
        proof = None
        if fleet.kind != "demo":  # first of all: the operator proves they hold the admin's key
            proof = await service.prove(admin, f"migrate {vm} to {host}")
            admin = proof.admin
        pf = await service.preflight(vm, host, admin)
        if tty:
            _print_preflight(pf)
        else:
            _emit("preflight", pf.as_json())
        if pf.ok and fleet.kind == "demo":
            if tty:
                click.echo(f"Pre-flight passed. Not migrating: {DEMO_EXPLANATION}.")
                click.echo(f"{pf.vm} stays running on {pf.source}.")
            else:
                _emit("demo", {"migrated": False, "message": DEMO_EXPLANATION, "vm_on": pf.source})
            return 1
        if pf.ok and not yes:
            if not sys.stdin.isatty():
                raise InputError("not on a terminal: pass --yes to confirm the migration")
            typed = click.prompt(f"Type the VM's name ({pf.vm}) to migrate it to {pf.target}",
                                 default="", show_default=False)
            if typed.strip() != pf.vm:
                click.echo(f"Not confirmed; nothing changed. {pf.vm} stays on {pf.source}.")
                return 1
        try:
            run = await service.start(pf, proof=proof)
        except MigrationRefused as exc:
            if tty:
                click.echo(f"REFUSED: {exc}. Nothing was changed; {pf.vm} stays on {pf.source or '?'}.")
            else:
                _emit("refused", {"message": str(exc), "reasons": [r.as_json() for r in pf.reasons],
                                  "vm_on": pf.source})
            return 1

        last: list[dict[str, Any]] = []

        def show(_run: Any, p: Any) -> None:
            if tty:
                click.echo("\r\x1b[2K" + progress_line(p), nl=False)
                return
            sample = p.as_json()
            if last and last[0] == sample:  # the same state again: nothing new to say
                return
            last[:] = [sample]
            _emit("progress", {"run": run.id, **sample})

        run.subscribe(show)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT,
                                    lambda: loop.create_task(run.abort("admin (Ctrl-C)")))
        try:
            result = await run.wait()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)
        out = result.outcome
        if tty:
            click.echo("")
            verdict = {"success": "MIGRATED", "aborted": "ABORTED", "unknown": "OUTCOME UNKNOWN"}.get(
                out.result, "FAILED")
            downtime = f", downtime {out.downtime_ms} ms" if out.downtime_ms is not None else ""
            click.echo(f"{verdict}: {out.message} (took {out.timings.get('total', 0):.1f} s{downtime})")
            if out.result != "success" or any(not h.answered for h in out.hosts):
                for h in out.hosts:
                    click.echo(f"  {h.describe()}")
            click.echo(f"  audit: {service.audit.path} (head {service.audit.head[:16]}…)")
        else:
            _emit("outcome", {"run": result.run_id, **out.as_json(), "audit_log": str(service.audit.path)})
        return 0 if out.result == "success" else 1
    finally:
        await service.close()
        await inventory.close()


@click.command("migrate")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.argument("vm")
@click.argument("host")
@click.option("--admin", default=None, metavar="ID",
              help="The admin acting (must hold a grant; default: the one admin whose key is present).")
@click.option("--admin-key", "admin_key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The admin's private SSH key (besides the SSH agent and the fleet's identity_files).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "json_out", is_flag=True, help="JSON lines (the default when not on a terminal).")
@click.option("--bandwidth", type=click.IntRange(0, 100_000), default=0, metavar="MIB/S",
              help="Cap the migration's bandwidth (0 = unlimited).")
@click.option("--stall-timeout", type=click.FloatRange(1, 3600), default=None, metavar="SECONDS",
              help="Abort when no progress for this long (default: the fleet file's stall_timeout_s).")
@click.option("--channels", type=click.IntRange(1, 255), default=None, metavar="N",
              help="TLS connections for the memory stream: 1 = one stream, 2+ = multifd "
                   "(default: one stream for guests up to 8 GiB, 2 above; docs/MIGRATION.md, "
                   "'TLS: one stream or several').")
@click.pass_context
def migrate(ctx: click.Context, fleet: str | None, vm: str, host: str, admin: str | None,
            admin_key: str | None, yes: bool, json_out: bool, bandwidth: int,
            stall_timeout: float | None, channels: int | None) -> None:
    """Live-migrate VM to HOST over TLS, after the same pre-flight the console shows.

    Exit 0 migrated and verified on HOST; 1 refused or failed (the VM's state is
    said); 2 unusable input; 3 read-only mode.
    """
    fleet_path = fleet or ctx.find_root().params.get("fleet_file")
    if not fleet_path:
        raise InputError("no fleet file: pass --fleet FILE")
    readonly = bool(ctx.find_root().params.get("readonly"))
    code = asyncio.run(_migrate(str(fleet_path), vm, host, admin, yes, json_out, readonly, bandwidth,
                                stall_timeout, admin_key, channels))
    raise click.exceptions.Exit(code)


# -- reconcile ------------------------------------------------------------------------------
async def _reconcile(fleet_path: str, admin: str | None, fix: bool, yes: bool, json_out: bool,
                     readonly: bool, admin_key: str | None = None) -> int:
    from console.core.errors import EscortError
    from console.services.fleet import FleetService
    from console.services.inventory import InventoryService, is_live
    from console.services.migration import MigrationService

    fleet = FleetService.load_strict(fleet_path, readonly=readonly)
    if fix:
        fleet.require_writable("reconcile")
    assert fleet.spec is not None
    inventory = InventoryService(fleet.spec, apply=fleet.apply_facts)
    from console.services.identity import AdminIdentity, terminal_prompt

    service = MigrationService(fleet, inventory, identity=AdminIdentity(
        fleet, admin_key=admin_key, passphrase=terminal_prompt()))
    try:
        names = [h.name for h in fleet.spec.hosts if is_live(h)]
        cases = await service.reconcile_scan(names)
        silent = {n: r.problem.message.removeprefix(f"{n}: ") if r.problem else "no answer"
                  for n, r in inventory.last.items() if r.facts is None}
        where: dict[str, list[str]] = {}
        for name, r in inventory.last.items():
            for d in r.facts.domains if r.facts is not None else ():
                where.setdefault(d.uuid, []).append(f"{d.state} on {name}")
        earlier = service.unverified()
        fixed: list[str] = []
        if fix and cases:
            todo = [c for c in cases if c.steps]
            if todo and not yes:
                if not sys.stdin.isatty():
                    raise InputError("not on a terminal: pass --yes to carry out the reconcile steps")
                if not click.confirm(f"Carry out the safe steps for {len(todo)} VM(s)?", default=False):
                    todo = []
            for case in todo:
                try:
                    done = await service.resolve(case, admin)
                    fixed.append(f"{case.name}: {', '.join(done)}")
                except EscortError as exc:
                    fixed.append(f"{case.name}: NOT fixed: {exc}")
            if todo:
                cases = await service.reconcile_scan(names)
        if json_out:
            click.echo(json.dumps({"cases": [c.as_json() for c in cases], "unreachable": silent,
                                   "unverified": [{"run": e.get("run"), "vm": e.get("vm"),
                                                   "uuid": e.get("uuid"), "source": e.get("source"),
                                                   "target": e.get("target"), "ts": e.get("ts"),
                                                   "now": where.get(str(e.get("uuid")), [])}
                                                  for e in earlier],
                                   "fixed": fixed}, sort_keys=True))
        else:
            for line in fixed:
                click.echo(f"fixed: {line}")
            for case in cases:
                click.echo(f"{case.name}: {case.message} [{case.code}]")
                click.echo(f"  copies: {'; '.join(c.describe() for c in case.copies)}")
                click.echo(f"  {case.advice}")
                if case.steps:
                    click.echo(f"  safe steps: {', '.join(f'{a} on {h}' for a, h in case.steps)}"
                               + ("" if fix else " (run with --fix to carry them out)"))
            for e in earlier:
                click.echo(unknown_outcome_line(e, where.get(str(e.get("uuid")), [])))
            for name, why in sorted(silent.items()):
                click.echo(f"{name}: could not be asked: {why}")
            if not cases and not silent:
                click.echo(f"nothing to reconcile: {len(names)} host(s) checked")
        return 0 if not cases and not silent else 1
    finally:
        await service.close()
        await inventory.close()


def unknown_outcome_line(entry: dict[str, Any], now: list[str]) -> str:
    """One line for a migration whose outcome was UNKNOWN, with where the VM is now ("running
    on fra-1", ...: what the hosts that answered said). A VM that is only shut off wherever it
    is defined (e.g. its QEMU crashed during the move: "shut off on fra-1") gets its next step
    here: reconcile has nothing to do for it, and escort never starts a VM by itself."""
    vm = str(entry.get("vm"))
    where = "; ".join(now) + " (checked)" if now else "found on no host that answered"
    line = (f"{vm}: the migration {entry.get('source')} -> {entry.get('target')} at {entry.get('ts')} "
            f"ended UNKNOWN; now: {where}")
    if now and all(state.startswith("shut off on ") for state in now):
        line += (f" -- it runs nowhere: check its QEMU log there (/var/log/libvirt/qemu/{vm}.log), then "
                 f"start it where it is defined (`virsh start {vm}`: a fresh boot; escort never starts a VM)")
    return line


@click.command("reconcile")
@click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None, help="Fleet file (TOML).")
@click.option("--fix", is_flag=True, help="Carry out each case's safe steps (audited first).")
@click.option("--admin", default=None, metavar="ID", help="The admin acting (with --fix).")
@click.option("--admin-key", "admin_key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The admin's private SSH key (with --fix; besides the agent and identity_files).")
@click.option("--yes", is_flag=True, help="Do not ask before --fix acts.")
@click.option("--json", "json_out", is_flag=True, help="Machine-readable output.")
@click.pass_context
def reconcile(ctx: click.Context, fleet: str | None, fix: bool, admin: str | None, admin_key: str | None,
              yes: bool, json_out: bool) -> None:
    """Find VMs a migration left half-done (on two hosts, paused, a leftover incoming
    copy) and migrations whose outcome was unknown; --fix carries out the safe steps.

    Exit 0 nothing to reconcile and every host answered; 1 cases found or a host could
    not be asked; 2 unusable input; 3 read-only mode (with --fix).
    """
    fleet_path = fleet or ctx.find_root().params.get("fleet_file")
    if not fleet_path:
        raise InputError("no fleet file: pass --fleet FILE")
    readonly = bool(ctx.find_root().params.get("readonly"))
    code = asyncio.run(_reconcile(str(fleet_path), admin, fix, yes, json_out, readonly, admin_key))
    raise click.exceptions.Exit(code)


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(audit_group)
    group.add_command(migrate)
    group.add_command(reconcile)
