"""A console opened with ``--at`` (a time fixed for looking) must not authorise moves at that time.

Probe2: ``FleetService(at=...)`` is what ``escort demo --lab --at T`` and the console's
``--at`` build; the migration service's pre-flight judged the admin's grant at that
fixed time. A grant valid only at T passed the pre-flight; start() then refused for
a misleading reason ("the pre-flight is N s old"), and with T less than a minute back
only the just-in-time re-check stood between it and the move. The pre-flight now
judges at the real time, like the re-check: the grant is refused for what it is.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import tomli_w

from console.core.grants import AdminRef, build_grant_payload, sign_grant

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab


async def test_preflight_judges_the_grant_now_not_at_a_fixed_time(lab: Lab, tmp_path: Path) -> None:
    from console.lab import certs
    from console.services.fleet import FleetService
    from console.services.inventory import InventoryService
    from console.services.migration import MigrationService

    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    admin = doc["admins"][0]
    pki = lab.pki or certs.load(lab.pki_dir)
    owner = pki.owners["alice"]
    now = dt.datetime.now(dt.UTC)
    grants = tmp_path / "grants"
    grants.mkdir()
    ref = AdminRef(admin["id"], ssh_key=admin["ssh_key_fingerprint"])
    payload = build_grant_payload(owner="alice", admin=ref, label="app",
                                  not_before=now + dt.timedelta(minutes=10),
                                  not_after=now + dt.timedelta(minutes=30))
    (grants / "later.jws").write_text(sign_grant(payload, owner.key, [owner.cert]) + "\n")
    doc["grants"] = [str(grants)]
    doc["audit_log"] = str(tmp_path / "audit.log")
    fleet_file = lab.dir / "fleet-fixed-time.toml"
    fleet_file.write_text(tomli_w.dumps(doc), encoding="utf-8")

    at = now + dt.timedelta(minutes=15)  # the grant is valid then, not now
    fleet = FleetService.load_strict(fleet_file, at=at)
    assert fleet.spec is not None
    inventory = InventoryService(fleet.spec, apply=fleet.apply_facts)
    service = MigrationService(fleet, inventory)
    try:
        pf = await service.preflight("app-1", "fra-2", admin["id"])
    finally:
        await service.close()
        await inventory.close()
    assert fleet.explain("app-1", "fra-2", admin["id"], at).allowed  # looking at T: allowed
    assert fleet.explain("app-1", "fra-2", admin["id"]).allowed  # the console's own view: its fixed T
    grant = next(i for i in pf.items if i.key == "grant")
    assert not pf.ok and [r.code for r in grant.reasons] == ["grant.not_yet_valid"], pf.items
