"""Outage drills on a running lab: ``escort lab fault ...`` and ``escort lab guest ...``.

Every fault acts on lab processes only, by PID, after checking the PID lives in that
lab host's network namespace (a process outside the lab is never signalled), and is
written to the lab fleet's audit log as a ``drill`` entry *before* it acts, so a drill
can never be mistaken for a real outage afterwards.

Bad input gets one line and touches nothing: an unknown host, a lab that is not up
(``lab fault`` refuses to act outside a lab), or the same fault twice in a row (the
daemon is already dead, the link already cut).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import time
import tomllib
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from console.core.errors import EscortError, InputError

from . import netns
from .hosts import HYPERVISORS, JUMP, GuestPlan, LabHost

if TYPE_CHECKING:
    from . import Lab

FAULTS = ("kill-libvirtd", "kill-qemu", "kill-sshd", "cut-link", "heal-link", "restart")
DEFAULT_GUEST_MEMORY_MIB = 128
DEFAULT_GUEST_FILL_MIB = 96
OWNERS = ("alice", "bob")
TRUST_NAMES = ("root", "eu-central", "eu-west")


class FaultRefused(EscortError):
    """The fault was refused (lab not up, already in that state): nothing was touched."""

    exit_code = 1


@dataclass
class FaultResult:
    action: str
    host: str
    what: str  # one line: what was done
    pids: list[int] = field(default_factory=list)
    audit_seq: int | None = None

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "host": self.host, "what": self.what, "pids": self.pids,
                "audit_seq": self.audit_seq}


# -- helpers ---------------------------------------------------------------------------------
def require_up(lab: Lab) -> None:
    """Refuse to act unless this lab is up (its namespaces and daemons were started by us)."""
    state = lab.recorded_status
    if state != "up" or not netns.netns_exists(lab.switch_ns):
        raise FaultRefused(f"lab {lab.name!r} in {lab.dir} is not up ({state or 'never started'}): "
                           "faults act only on a running lab; start it with `escort lab up`")


def _host(lab: Lab, name: str) -> LabHost:
    names = [p.name for p in HYPERVISORS] + [JUMP]
    if name not in names:
        raise InputError(f"no lab host {name!r}; hosts: {', '.join(names)}")
    return lab.host(name)


def _hypervisor(lab: Lab, name: str) -> LabHost:
    h = _host(lab, name)
    if h.kind != "hypervisor":
        raise InputError(f"{name} is the jump host: it runs no libvirtd or guests")
    return h


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return ""


def _pids_named(h: LabHost, comm: str) -> list[int]:
    """Live processes called ``comm`` in the host's network namespace (lab processes only)."""
    return sorted(pid for pid, _ns in netns.pids_in_netns([h.ns]).items() if _comm(pid) == comm)


def _alive(pid_file: Path, h: LabHost) -> int | None:
    pid = netns.read_pid(pid_file)
    return pid if pid is not None and netns.pid_in_netns(pid, h.ns) else None


def _sigkill(pids: list[int], h: LabHost, *, grace: float = 5.0) -> list[int]:
    """SIGKILL each PID that (still) lives in the host's namespace; wait until they are gone."""
    done: list[int] = []
    for pid in pids:
        if netns.pid_in_netns(pid, h.ns):
            try:
                os.kill(pid, signal.SIGKILL)
                done.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(netns.pid_alive(p) for p in done):
        time.sleep(0.02)
    return done


def _link_up(lab: Lab, h: LabHost) -> bool:
    out = netns.ip("-n", lab.switch_ns, "-o", "link", "show", h.switch_port, check=False).stdout
    flags = out.split("<", 1)[1].split(">", 1)[0].split(",") if "<" in out else []
    return "UP" in flags


def _audit_path(lab: Lab) -> Path:
    try:
        doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
        rel = str(doc.get("audit_log") or "audit.log")
    except (OSError, tomllib.TOMLDecodeError):
        rel = "audit.log"
    path = Path(rel)
    return path if path.is_absolute() else lab.fleet_file.parent / path


def _record(lab: Lab, entry: dict[str, Any]) -> int | None:
    """Append a drill entry to the lab fleet's audit log (fsynced) before acting."""
    from console.adapters.audit import AuditLog

    with AuditLog(_audit_path(lab)) as log:
        written = log.append({"kind": "drill", "lab": lab.name, **entry})
    seq = written.get("seq")
    return seq if isinstance(seq, int) else None


# -- faults ----------------------------------------------------------------------------------
def inject(lab: Lab, action: str, host: str, vm: str = "") -> FaultResult:
    """Carry out one drill action; raises InputError/FaultRefused with one line otherwise."""
    if action not in FAULTS:
        raise InputError(f"unknown fault {action!r}; faults: {', '.join(FAULTS)}")
    if action == "kill-qemu" and not vm:
        raise InputError("kill-qemu needs the VM: escort lab fault kill-qemu HOST VM")
    if action != "kill-qemu" and vm:
        raise InputError(f"{action} takes one HOST, not a VM")
    require_up(lab)
    h = _host(lab, host)
    if action == "kill-libvirtd":
        h = _hypervisor(lab, host)
        pid = _alive(h.libvirtd_pid_file, h)
        if pid is None:
            raise FaultRefused(f"{host}: libvirtd is already down (bring it back: escort lab fault "
                               f"restart {host})")
        seq = _record(lab, {"action": action, "host": host, "pids": [pid]})
        killed = _sigkill([pid], h)
        return FaultResult(action, host, f"{host}: libvirtd ({pid}) killed; its guests' QEMU keep running",
                           killed, seq)
    if action == "kill-qemu":
        h = _hypervisor(lab, host)
        pid = _alive(h.root / "run" / "libvirt" / "qemu" / f"{vm}.pid", h)
        if pid is None or _comm(pid).startswith("qemu") is False:
            raise FaultRefused(f"{host}: no running QEMU for VM {vm!r}")
        seq = _record(lab, {"action": action, "host": host, "vm": vm, "pids": [pid]})
        killed = _sigkill([pid], h)
        return FaultResult(action, host, f"{host}: QEMU of {vm} ({pid}) killed", killed, seq)
    if action == "kill-sshd":
        pids = _pids_named(h, "sshd")
        if not pids:
            raise FaultRefused(f"{host}: no sshd is running (bring it back: escort lab fault restart {host})")
        seq = _record(lab, {"action": action, "host": host, "pids": pids})
        killed = _sigkill(pids, h)
        return FaultResult(action, host, f"{host}: {len(killed)} sshd process(es) killed "
                           "(listener and every session)", killed, seq)
    if action in ("cut-link", "heal-link"):
        up = _link_up(lab, h)
        if action == "cut-link" and not up:
            raise FaultRefused(f"{host}: its link is already cut "
                               f"(heal it: escort lab fault heal-link {host})")
        if action == "heal-link" and up:
            raise FaultRefused(f"{host}: its link is not cut")
        seq = _record(lab, {"action": action, "host": host, "port": h.switch_port})
        if action == "cut-link":
            lab.cut_link(host)
            return FaultResult(action, host, f"{host}: link {h.switch_port} down (cable pulled)", [], seq)
        lab.restore_link(host)
        return FaultResult(action, host, f"{host}: link {h.switch_port} up again", [], seq)
    # restart: bring back what is down (never touches a daemon that runs)
    todo: list[str] = []
    if h.kind == "hypervisor" and _alive(h.libvirtd_pid_file, h) is None:
        todo.append("libvirtd")
    if _alive(h.sshd_pid_file, h) is None:
        todo.append("sshd")
    if not todo:
        raise FaultRefused(f"{host}: nothing to restart (libvirtd and sshd run)"
                           if h.kind == "hypervisor" else f"{host}: nothing to restart (sshd runs)")
    seq = _record(lab, {"action": action, "host": host, "daemons": todo})
    for daemon in todo:
        if daemon == "libvirtd":
            lab.start_libvirtd(host)
        else:
            h.sshd_pid_file.unlink(missing_ok=True)
            lab.start_sshd(host)
            lab._wait_sshd([h])
    pids = [p for p in (_alive(h.libvirtd_pid_file, h) if "libvirtd" in todo else None,
                        _alive(h.sshd_pid_file, h) if "sshd" in todo else None) if p]
    return FaultResult(action, host, f"{host}: {' and '.join(todo)} started again", pids, seq)


# -- guests ----------------------------------------------------------------------------------
def _registry(lab: Lab) -> dict[str, dict[str, Any]]:
    path = lab.dir / "drill-guests.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_registry(lab: Lab, data: dict[str, dict[str, Any]]) -> None:
    path = lab.dir / "drill-guests.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


Requirements = tuple[tuple[str, tuple[str, ...]], ...]


def parse_policy(specs: tuple[str, ...] | list[str]) -> tuple[tuple[str, ...], Requirements]:
    """``trust=root,eu-west`` and ``KEY=V1,V2`` (country=DE,FR; policies=assurance:high)."""
    trust: tuple[str, ...] = ("root",)
    require: list[tuple[str, tuple[str, ...]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        vals = tuple(v.strip() for v in values.split(",") if v.strip())
        if not sep or not key or not vals:
            raise InputError(f"--policy {spec!r}: use trust=CA[,CA] or KEY=VALUE[,VALUE] "
                             "(e.g. country=DE,FR or policies=assurance:high)")
        if key == "trust":
            bad = [v for v in vals if v not in TRUST_NAMES]
            if bad:
                raise InputError(f"--policy trust: unknown CA {bad[0]!r}; use {', '.join(TRUST_NAMES)}")
            trust = vals
        else:
            require.append((key, vals))
    return trust, tuple(require)


def _find(lab: Lab, name: str) -> list[str]:
    """Hypervisors on which a domain called ``name`` is defined (asked of each libvirtd)."""
    import libvirt

    hosts = []
    for host in lab.hypervisors:
        try:
            conn = lab.open_libvirt(host)
        except EscortError:
            continue
        try:
            conn.lookupByName(name)
            hosts.append(host)
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return hosts


def add_guest(lab: Lab, name: str, host: str, *, memory_mib: int = DEFAULT_GUEST_MEMORY_MIB,
              fill_mib: int | None = None, owner: str = "alice",
              policy: tuple[str, ...] = ()) -> dict[str, Any]:
    """Define and start a guest with random-filled RAM, an owner-signed policy and a grant
    for the lab admin. Returns what was created."""
    from . import certs, guests

    require_up(lab)
    h = _hypervisor(lab, host)
    if not name or len(name) > 40 or not all(c.isalnum() or c in "-_" for c in name) or not name[0].isalpha():
        raise InputError(f"guest name {name!r}: use letters, digits, - and _ (starting with a letter)")
    if owner not in OWNERS:
        raise InputError(f"--owner {owner!r}: the lab's owners are {', '.join(OWNERS)}")
    fill = DEFAULT_GUEST_FILL_MIB if fill_mib is None else fill_mib
    if memory_mib < 32:
        raise InputError("--memory: at least 32 MiB")
    if fill and fill + 16 > memory_mib:
        raise InputError(f"--fill {fill} MiB does not fit in --memory {memory_mib} MiB "
                         "(the random blob starts at 16 MiB)")
    trust, require = parse_policy(policy)
    where = _find(lab, name)
    if where:
        raise FaultRefused(f"a guest named {name!r} already exists on {', '.join(where)}")
    assert h.plan is not None
    if lab.pki is None:
        lab.pki = certs.load(lab.pki_dir)
    vm_uuid = str(uuidlib.uuid4())
    plan = GuestPlan(name, owner, memory_mib=memory_mib, trust=trust, require=require,
                     labels=("drill",))
    meta = guests.policy_metadata(lab.pki, h.plan, plan, vm_uuid)
    blob = guests.blob_path(lab.dir, fill) if fill else None
    conn = lab.open_libvirt(host)
    try:
        guests.define_guest(conn, name, memory_mib=memory_mib, uuid=vm_uuid, metadata_xml=meta,
                            random_blob=blob)
    finally:
        conn.close()
    grant = lab.grant_vm(owner, vm_uuid, name)
    reg = _registry(lab)
    reg[name] = {"uuid": vm_uuid, "host": host, "owner": owner, "grant": str(grant),
                 "memory_mib": memory_mib, "fill_mib": fill,
                 "added": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    _save_registry(lab, reg)
    return {"name": name, **reg[name]}


def remove_guest(lab: Lab, name: str) -> list[str]:
    """Destroy and undefine a guest ``guest add`` created (wherever it runs now)."""
    import libvirt

    require_up(lab)
    reg = _registry(lab)
    if name not in reg:
        raise InputError(f"no guest {name!r} was added with `escort lab guest add` in lab {lab.name!r}")
    uuid = str(reg[name].get("uuid", ""))
    done: list[str] = []
    for host in lab.hypervisors:
        conn = lab.open_libvirt(host)
        try:
            try:
                dom = conn.lookupByUUIDString(uuid)
            except libvirt.libvirtError:
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefine()
            except libvirt.libvirtError as exc:  # a transient leftover libvirt removed meanwhile
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
            done.append(host)
        finally:
            conn.close()
    grant = Path(str(reg[name].get("grant", "")))
    if grant.name and grant.parent == lab.dir / "grants":
        grant.unlink(missing_ok=True)
    del reg[name]
    _save_registry(lab, reg)
    return done


__all__ = ["FAULTS", "FaultRefused", "FaultResult", "add_guest", "inject", "parse_policy", "remove_guest",
           "require_up"]
