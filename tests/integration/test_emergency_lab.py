"""Emergency-only grants on the lab: no declaration, a healthy source — ordinary grants only;
the source actually down (its sshd killed with the lab's fault tool) — the grant counts,
and the move is still refused because nothing can be live-migrated off a host escort
cannot reach.

The pre-flight is the one every move of an evacuation runs (``emergency=True``: "count
emergency-only grants if the source is under an emergency"); the emergency's basis is
decided there, at the moment of the move (services/migration.py ``emergency_basis``).
The fleet file here has its own audit log, so no declaration of another test counts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import tomllib
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import tomli_w

from console.core.grants import AdminRef, build_grant_payload, sign_grant
from console.lab import faults
from console.services.fleet import FleetService
from console.services.inventory import InventoryService
from console.services.migration import MigrationService
from tests.integration.test_evacuation_lab import ADMIN, _pki, _remove, _where

if TYPE_CHECKING:
    from console.core.migration import Preflight
    from console.lab import Lab

pytestmark = pytest.mark.lab

SOURCE = "par-1"
TARGET = "fra-1"


@pytest.fixture()
def created(lab: Lab) -> Iterator[list[str]]:
    uuids: list[str] = []
    yield uuids
    _remove(lab, uuids)


def _fleet(lab: Lab, tmp_path: Path, uuid: str) -> Path:
    """The lab's fleet with one grants directory (alice's emergency-only grant for ``uuid``)
    and an audit log of its own (no declarations)."""
    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    grants = tmp_path / "grants"
    grants.mkdir()
    doc["grants"] = [str(grants)]
    doc["audit_log"] = str(tmp_path / "audit.log")
    fp = next(a["ssh_key_fingerprint"] for a in doc["admins"] if a["id"] == ADMIN)
    signer = _pki(lab).owners["alice"]
    now = dt.datetime.now(dt.UTC)
    payload = build_grant_payload(owner="alice", admin=AdminRef(ADMIN, ssh_key=fp), vms=[uuid],
                                  not_before=now - dt.timedelta(minutes=5),
                                  not_after=now + dt.timedelta(hours=1), emergency_only=True)
    (grants / "emergency.jws").write_text(sign_grant(payload, signer.key, [signer.cert]))
    path = lab.dir / f"fleet-emergency-down-{uuidlib.uuid4().hex[:6]}.toml"
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


class Mover:
    """One migration service for the whole test, as one evacuation run has: the VM was seen
    on its healthy source before the source went down (a fresh process would not know it)."""

    def __init__(self, fleet_path: Path) -> None:
        self.fleet = FleetService.load_strict(fleet_path, eager=True)
        self.inventory = InventoryService.for_fleet(self.fleet)
        self.migrations = MigrationService(self.fleet, self.inventory)

    async def refresh(self) -> None:
        for name, r in (await self.inventory.refresh()).items():
            self.fleet.apply_facts(name, r.facts, r.problem)

    async def preflight(self, uuid: str) -> tuple[Preflight, str]:
        """The pre-flight an evacuation's move runs; and the emergency basis it found."""
        pf = await self.migrations.preflight(uuid, TARGET, ADMIN, emergency=True)
        return pf, self.migrations.emergency_basis(SOURCE)

    async def close(self) -> None:
        await self.migrations.close()
        await self.inventory.close()


def _codes(pf: Preflight, key: str) -> list[str]:
    item = pf.item(key)  # type: ignore[arg-type]
    assert item is not None, f"no {key} check ran"
    return [r.code for r in item.reasons if r.severity == "error"]


def _evacuate_dry(fleet: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "console", "evacuate", "--fleet", str(fleet), SOURCE,
                          "--admin", ADMIN, "--dry-run", "--json"], capture_output=True, text=True,
                         timeout=180)
    doc: dict[str, Any] = json.loads(out.stdout.splitlines()[0])
    assert doc["event"] == "plan", out.stderr
    return doc


def test_emergency_only_grant_counts_with_the_source_down_never_for_a_healthy_one(
        lab: Lab, tmp_path: Path, created: list[str]) -> None:
    uuid = lab.define_guest(SOURCE, "em-down", owner="alice")  # trusts the lab root: fra-1 admits it
    created.append(uuid)
    fleet = _fleet(lab, tmp_path, uuid)

    asyncio.run(_scenario(lab, fleet, uuid))
    assert _where(lab, uuid) == {SOURCE: "running"}  # nothing moved


async def _scenario(lab: Lab, fleet: Path, uuid: str) -> None:
    mover = Mover(fleet)
    try:
        await mover.refresh()
        # healthy source, nothing declared: only ordinary grants count, so this one does not
        pf, basis = await mover.preflight(uuid)
        assert basis == ""
        assert _codes(pf, "grant") == ["grant.emergency_only"], pf.reasons
        assert _codes(pf, "reachable") == []
        assert not pf.ok and pf.plan is None
        healthy = await asyncio.to_thread(_evacuate_dry, fleet)
        (stuck,) = [s for s in healthy["stuck"] if s["vm"] == "em-down"]
        assert "grant.emergency_only" in json.dumps(stuck)

        # the source actually down (every sshd process on it killed: `escort lab fault kill-sshd`)
        await asyncio.to_thread(faults.inject, lab, "kill-sshd", SOURCE)
        try:
            pf, basis = await mover.preflight(uuid)  # refreshes source and target first
            assert basis.startswith(f"{SOURCE} is down"), basis
            assert _codes(pf, "grant") == [], pf.reasons  # the emergency-only grant counts now
            # ... but nothing can be live-migrated off a host escort cannot reach: refused
            assert _codes(pf, "reachable") == ["migration.unreachable"], pf.reasons
            assert not pf.ok and pf.plan is None
            down = await asyncio.to_thread(_evacuate_dry, fleet)  # a new process: par-1's VMs unknown
            assert [m["vm"] for m in down["moves"]] == []
            assert "evacuate.source_unreachable" in json.dumps(down["notes"]), down
        finally:
            await asyncio.to_thread(faults.inject, lab, "restart", SOURCE)

        # back up, still nothing declared: ordinary grants only again
        pf, basis = await mover.preflight(uuid)
        assert basis == "" and _codes(pf, "grant") == ["grant.emergency_only"], (basis, pf.reasons)
    finally:
        await mover.close()
