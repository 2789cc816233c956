"""``escort lab up|down|status``: real hypervisor hosts in network namespaces (root).

See docs/LAB.md for the topology and how it stays contained. Exit codes: 0 fine,
1 the lab failed (or ``status`` found a host not answering), 2 not root / bad input.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from console.lab import Lab


def _lab(dir_: str | None, name: str) -> Lab:
    # Imported lazily: `escort` starts without loading the lab (and libvirt).
    from console.lab import Lab, require_root

    require_root()  # one clear line and exit 2 before anything else happens
    return Lab(dir_, name)


_dir_option = click.option("--dir", "dir_", type=click.Path(file_okay=False), default=None,
                           help="Lab directory (default /var/lib/escort-lab/NAME).")
_name_option = click.option("--name", default=lambda: os.environ.get("ESCORT_LAB_NAME", "demo"),
                            show_default="demo",
                            help="Lab name: namespace prefix esc-NAME- (1-10 of a-z0-9).")


@click.group("lab")
def lab_group() -> None:
    """Real hosts (libvirtd, QEMU, sshd) in network namespaces on this machine; needs root."""


@lab_group.command("up")
@_dir_option
@_name_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-guard", is_flag=True,
              help="Leave the escort host guard out (default: installed on every hypervisor).")
def lab_up(dir_: str | None, name: str, as_json: bool, no_guard: bool) -> None:
    """Start the lab (idempotent; cleans up after a crashed earlier run)."""
    lab = _lab(dir_, name)
    result = lab.up(guard=not no_guard)
    if as_json:
        click.echo(json.dumps({"already": result.already, "seconds": round(result.seconds, 3),
                               "dir": str(result.dir), "fleet_file": str(result.fleet_file),
                               "ssh_config": str(lab.ssh_config), "guests": result.guests,
                               "policies": result.policies, "guard": result.guard}))
        return
    if result.already:
        click.echo(f"lab {lab.name!r} is already up in {lab.dir} (`escort lab status` shows it)")
    else:
        extra = "" if result.policies else " (no signed policies: core/policy.py unavailable)"
        guard = "escort guard on every hypervisor" if result.guard else "NO host guard (--no-guard)"
        click.echo(f"lab {lab.name!r} up in {result.seconds:.1f} s: {len(lab.hypervisors)} "
                   f"hypervisors behind a jump host, {result.guests} guests{extra}; {guard}")
    click.echo(f"  fleet file   {result.fleet_file}")
    click.echo(f"  ssh          ssh -F {lab.ssh_config} {lab.hypervisors[0]}")
    click.echo(f"  console      escort --fleet {result.fleet_file}")


@lab_group.command("down")
@_dir_option
@_name_option
def lab_down(dir_: str | None, name: str) -> None:
    """Stop every process the lab started and delete its namespaces."""
    lab = _lab(dir_, name)
    stopped = lab.down()
    click.echo(f"lab {lab.name!r} down: {len(stopped)} process(es) stopped, namespaces deleted")


@lab_group.command("status")
@_dir_option
@_name_option
@click.option("--json", "as_json", is_flag=True, help="Print the hosts as JSON.")
@click.pass_context
def lab_status(ctx: click.Context, dir_: str | None, name: str, as_json: bool) -> None:
    """Hosts, their PIDs, and whether sshd and libvirtd answer."""
    lab = _lab(dir_, name)
    hosts = lab.status()
    recorded = lab.recorded_status
    healthy = recorded == "up" and all(h.sshd_ok and (h.kind == "jump" or h.libvirtd_ok)
                                       for h in hosts)
    if as_json:
        from dataclasses import asdict

        click.echo(json.dumps({"name": lab.name, "dir": str(lab.dir), "up": healthy,
                               "recorded_status": recorded,
                               "hosts": [asdict(h) for h in hosts]}, indent=2))
    else:
        note = {"up": "", "starting": " - an earlier `up` did not finish: run `escort lab up`",
                "down": " - stopped: run `escort lab up`"}.get(recorded, "")
        click.echo(f"lab {lab.name!r} in {lab.dir}: {recorded or 'unknown'}{note}")
        click.echo(f"{'HOST':<9} {'ADDRESS':<15} {'SSHD':<13} {'LIBVIRTD':<13} GUESTS / PROBLEM")
        for h in hosts:
            sshd = f"{'ok' if h.sshd_ok else 'DOWN'} {h.sshd_pid or '-'}"
            if h.kind == "jump":
                libvirtd = "(jump host)"
            else:
                libvirtd = f"{'ok' if h.libvirtd_ok else 'DOWN'} {h.libvirtd_pid or '-'}"
            detail = h.problem or (", ".join(h.guests) if h.guests else "")
            click.echo(f"{h.name:<9} {h.address:<15} {sshd:<13} {libvirtd:<13} {detail}")
        click.echo(f"fleet file: {Path(lab.fleet_file)}")
    if not healthy:
        ctx.exit(1)


# -- guests for drills ----------------------------------------------------------------------
@lab_group.group("guest")
def guest_group() -> None:
    """Add or remove a guest whose RAM is full of random data (migrations take visible time)."""


@guest_group.command("add")
@click.argument("vm")
@click.option("--host", required=True, help="The hypervisor to start it on (fra-1, fra-2, par-1, rogue-1).")
@click.option("--memory", "memory", type=click.IntRange(32, 4096), default=128, show_default=True,
              metavar="MIB", help="Guest RAM.")
@click.option("--fill", "fill", type=click.IntRange(0, 4000), default=None, metavar="MIB",
              help="RAM filled with random bytes (default: 96 MiB; 0 = none).")
@click.option("--owner", default="alice", show_default=True,
              help="Who signs its policy and grant (alice, bob).")
@click.option("--policy", "policy", multiple=True, metavar="SPEC",
              help="trust=CA[,CA] (root, eu-central, eu-west; default root) or KEY=V[,V] "
                   "(country=DE,FR; policies=assurance:high). Repeatable.")
@_dir_option
@_name_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def guest_add(vm: str, host: str, memory: int, fill: int | None, owner: str, policy: tuple[str, ...],
              dir_: str | None, name: str, as_json: bool) -> None:
    """Define and start VM on HOST, with an owner-signed policy and a grant for lab-admin."""
    from console.lab import faults

    lab = _lab(dir_, name)
    out = faults.add_guest(lab, vm, host, memory_mib=memory, fill_mib=fill, owner=owner, policy=policy)
    if as_json:
        click.echo(json.dumps(out, sort_keys=True))
        return
    click.echo(f"{vm} runs on {host}: {out['memory_mib']} MiB, {out['fill_mib']} MiB of it random; policy "
               f"signed by {owner}; grant for lab-admin in {out['grant']}")
    click.echo(f"  migrate it:  escort migrate --fleet {lab.fleet_file} {vm} TARGET --admin lab-admin "
               "--bandwidth 5")


@guest_group.command("remove")
@click.argument("vm")
@_dir_option
@_name_option
def guest_remove(vm: str, dir_: str | None, name: str) -> None:
    """Destroy and undefine a guest added with `escort lab guest add` (wherever it runs now)."""
    from console.lab import faults

    lab = _lab(dir_, name)
    hosts = faults.remove_guest(lab, vm)
    where = f" from {', '.join(hosts)}" if hosts else " (it was on no host any more)"
    click.echo(f"{vm} removed{where}; its grant deleted")


# -- outage drills ---------------------------------------------------------------------------
@lab_group.group("fault")
def fault_group() -> None:
    """Outage drills: kill a daemon, a VM's QEMU or a link on a lab host (lab processes only,
    by PID; each recorded in the lab's audit log as a drill). `restart` and `heal-link` undo."""


def _fault_command(action: str, doc: str, *, vm: bool = False) -> None:
    def command(host: str, dir_: str | None, name: str, as_json: bool, vm_name: str = "") -> None:
        from console.lab import faults

        lab = _lab(dir_, name)
        result = faults.inject(lab, action, host, vm_name)
        if as_json:
            click.echo(json.dumps(result.as_json(), sort_keys=True))
        else:
            seq = f" (audit #{result.audit_seq}, drill)" if result.audit_seq is not None else ""
            click.echo(f"{result.what}{seq}")

    command.__doc__ = doc
    as_json = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    decorated: Any = as_json(command)
    decorated = _name_option(_dir_option(decorated))
    if vm:
        decorated = click.argument("vm_name", metavar="VM")(decorated)
    decorated = click.argument("host")(decorated)  # applied last: the first argument
    fault_group.command(action)(decorated)


_fault_command("kill-libvirtd", "SIGKILL HOST's libvirtd (its guests keep running, as on a real host).")
_fault_command("kill-qemu", "SIGKILL the QEMU process of VM on HOST (a crash, as far as libvirt knows).",
               vm=True)
_fault_command("kill-sshd", "SIGKILL every sshd of HOST (listener and sessions); `jump` is the jump host.")
_fault_command("cut-link", "Pull HOST's cable on the lab network (migration and SSH traffic stop silently).")
_fault_command("heal-link", "Plug HOST's cable back in.")
_fault_command("restart", "Start HOST's killed daemons (libvirtd, sshd) again; running ones are left alone.")


def register(group: click.Group) -> None:
    """Add this module's commands to ``group``."""
    group.add_command(lab_group)
