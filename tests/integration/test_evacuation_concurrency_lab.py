"""Two `escort evacuate` processes at once never overfill a target — checked with plain virsh.

Two sources (fra-2 and par-1) are evacuated by two escort processes started together,
as two operators would, onto one target (fra-1) that has room for only some of their
VMs. Each process plans on its own (each sees all of fra-1's room, so together they
plan more than fits); the check right before each ``migrate3`` (the target's room now,
counted as the planner counts it, minus the memory other migrations — in this process
or another, via the reservations file next to the shared audit log — already reserved
there) must refuse the rest. While they run, ``virsh domstats`` on fra-1 is sampled:
the memory given to its active domains must never exceed its memory (``virsh
nodeinfo``); afterwards every VM runs on exactly one host (``virsh list`` on each).

Capacity is made small the way tests/integration/test_evacuation_lab.py does it: a
ballast guest whose (never touched) memory is promised to it.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import threading
import tomllib
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tomli_w

from console.core.grants import AdminRef, build_grant_payload, sign_grant
from tests.integration.test_evacuation_lab import ADMIN, _pki, _remove

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab

TARGET = "fra-1"
SOURCES = ("fra-2", "par-1")
VM_MIB = 256
PER_SOURCE = 3
ROOM_VMS = 3  # fra-1 holds 3 of the 6
ROOM_MIB = ROOM_VMS * VM_MIB + 100


def _virsh(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Plain virsh on the host's own libvirt socket (no escort code in between)."""
    return subprocess.run(["virsh", "-c", lab.host(host).libvirt_uri, *args], capture_output=True, text=True,
                          timeout=60, check=False, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})


def _memory_kib(lab: Lab, host: str) -> int:
    out = _virsh(lab, host, "nodeinfo")
    assert out.returncode == 0, out.stderr
    (line,) = [ln for ln in out.stdout.splitlines() if ln.startswith("Memory size:")]
    return int(line.split()[2])


def _committed_kib(lab: Lab, host: str) -> int | None:
    """KiB given to the host's active domains (incoming migrations included); None when
    virsh could not answer this time (a domain vanished mid-listing)."""
    out = _virsh(lab, host, "domstats", "--list-active", "--balloon")
    if out.returncode != 0:
        return None
    return sum(int(ln.split("=", 1)[1]) for ln in out.stdout.splitlines()
               if ln.strip().startswith("balloon.maximum="))


def _running_uuids(lab: Lab, host: str) -> set[str]:
    out = _virsh(lab, host, "list", "--uuid")
    assert out.returncode == 0, out.stderr
    return {ln.strip() for ln in out.stdout.splitlines() if ln.strip()}


@pytest.fixture()
def created(lab: Lab) -> Iterator[list[str]]:
    uuids: list[str] = []
    yield uuids
    _remove(lab, uuids)


def _guest(lab: Lab, host: str, name: str, countries: tuple[str, ...]) -> str:
    """alice's small guest whose policy admits hosts under the lab root in ``countries``."""
    from console.lab import guests
    from console.lab.hosts import GuestPlan, hypervisor

    vm_uuid = str(uuidlib.uuid4())
    plan = GuestPlan(name, "alice", memory_mib=VM_MIB, require=(("country", countries),))
    meta = guests.policy_metadata(_pki(lab), hypervisor(host), plan, vm_uuid)
    conn = lab.open_libvirt(host)
    try:
        guests.define_guest(conn, name, memory_mib=VM_MIB, uuid=vm_uuid, metadata_xml=meta)
    finally:
        conn.close()
    return vm_uuid


def _ballast(lab: Lab, host: str, room_mib: int, name: str) -> str:
    """A guest without a policy whose promised memory leaves ``room_mib`` on ``host``."""
    total = _memory_kib(lab, host) // 1024
    committed = _committed_kib(lab, host)
    assert committed is not None
    return lab.define_guest(host, name, memory_mib=total - committed // 1024 - room_mib)


def test_two_concurrent_evacuations_never_overfill_the_target(lab: Lab, tmp_path: Path,
                                                               created: list[str]) -> None:
    # one fleet file for both operators: the same audit log, so the same reservations file
    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    grants = tmp_path / "grants"
    grants.mkdir()
    doc["grants"] = [str(grants)]  # only this test's VMs are granted: the lab's own stay put
    doc["audit_log"] = str(tmp_path / "audit.log")
    fleet = lab.dir / f"fleet-concurrent-{uuidlib.uuid4().hex[:6]}.toml"
    fleet.write_text(tomli_w.dumps(doc), encoding="utf-8")

    # fra-2 (a source) is kept full, so par-1's VMs can only go to fra-1
    created.append(_ballast(lab, "fra-2", 100, "cc-ballast-2"))
    created.append(_ballast(lab, TARGET, ROOM_MIB, "cc-ballast-1"))
    vms = {"fra-2": [_guest(lab, "fra-2", f"cc-a{i}", ("DE",)) for i in range(PER_SOURCE)],
           "par-1": [_guest(lab, "par-1", f"cc-b{i}", ("DE", "FR")) for i in range(PER_SOURCE)]}
    mine = [u for us in vms.values() for u in us]
    created.extend(mine)
    fp = next(a["ssh_key_fingerprint"] for a in doc["admins"] if a["id"] == ADMIN)
    signer = _pki(lab).owners["alice"]
    now = dt.datetime.now(dt.UTC)
    payload = build_grant_payload(owner="alice", admin=AdminRef(ADMIN, ssh_key=fp), vms=mine,
                                  not_before=now - dt.timedelta(minutes=5),
                                  not_after=now + dt.timedelta(hours=1))
    (grants / "cc.jws").write_text(sign_grant(payload, signer.key, [signer.cert]))

    limit = _memory_kib(lab, TARGET)
    before = _committed_kib(lab, TARGET)
    assert before is not None and 0 <= limit - before - ROOM_MIB * 1024 < 1024  # room for ROOM_VMS only

    samples: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            c = _committed_kib(lab, TARGET)
            if c is not None:
                samples.append(c)
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs = {src: subprocess.Popen([sys.executable, "-m", "console", "evacuate", "--fleet", str(fleet), src,
                                    "--admin", ADMIN, "--yes", "--json", "--cpu-ratio", "8"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   stdin=subprocess.DEVNULL)
             for src in SOURCES}
    try:
        outs = {src: p.communicate(timeout=600) for src, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        stop.set()
        watcher.join(timeout=30)

    docs = {src: [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
            for src, (out, _e) in outs.items()}
    for src, lines in docs.items():
        assert lines and lines[0]["event"] == "plan" and lines[-1]["event"] == "summary", outs[src]
    planned = {src: [m["vm"] for m in lines[0]["moves"] if m["target"] == TARGET]
               for src, lines in docs.items()}
    # each planned alone with fra-1's whole room: together they planned more than fits
    assert sum(len(p) for p in planned.values()) > ROOM_VMS, planned

    # from libvirt directly: fra-1 never held more than its memory, at any sample
    assert samples, "virsh domstats never answered"
    assert max(samples) <= limit, (max(samples), limit, planned)
    on_target = _running_uuids(lab, TARGET) & set(mine)
    assert 1 <= len(on_target) <= ROOM_VMS
    final = _committed_kib(lab, TARGET)
    assert final is not None and final <= limit
    # every VM runs on exactly one host
    running = {h: _running_uuids(lab, h) for h in lab.hypervisors}
    for u in mine:
        assert sum(u in r for r in running.values()) == 1, (u, running)
    # what the two summaries say matches libvirt; the VMs that did not fit were refused
    # for memory at the last moment (or planned as stuck by a process that saw less room)
    moved = [m for lines in docs.values() for m in lines[-1]["moved"] if m["to"] == TARGET]
    assert len(moved) == len(on_target)
    not_moved = PER_SOURCE * 2 - len(moved)
    refused_codes = [r["code"] for lines in docs.values() for f in lines[-1].get("failed", [])
                     for r in f.get("reasons", [])]
    stuck = [s["vm"] for lines in docs.values() for s in lines[-1].get("not_movable", [])
             if s["vm"].startswith("cc-")]
    assert not_moved >= PER_SOURCE * 2 - ROOM_VMS
    assert refused_codes.count("migration.no_memory") + len(stuck) >= not_moved, (refused_codes, stuck)
