"""TESTS ONLY: drive a migration past escort's own checks, to prove QEMU's TLS pin refuses.

This lives in tests/, never in console/: no CLI or UI path can reach it. It bypasses
escort's local pre-flight *and* the just-in-time checks before ``migrate3`` (by
overriding ``_just_in_time``), writes an audit entry that says so, and launches.
"""

from __future__ import annotations

import datetime as dt
import uuid as uuidlib
from typing import Any

from console.core import migration as mig
from console.services.migration import MigrationResult, MigrationService


class UncheckedMigrationService(MigrationService):
    """A MigrationService whose just-in-time checks pass whatever they find (tests only)."""

    async def _just_in_time(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []


async def force_unchecked_migration(service: MigrationService, vm_uuid: str, vm_name: str, source: str,
                                    target: str, tls_name: str, *, admin: str) -> MigrationResult:
    """Skip the local pre-flight and launch; the audit log records that it was bypassed."""
    await service.prove(admin, "forced migration (test only)")  # the entries are signed as usual
    spec = service.inventory.spec(target)
    plan = mig.MigrationPlan(vm_uuid=vm_uuid, vm_name=vm_name, source=source, target=target,
                             tls_name=tls_name, migration_uri=mig.migration_uri(spec.migration_address),
                             cert_fingerprint="", admin=admin, bandwidth_mib_s=service.bandwidth_mib_s,
                             channels=service.channels if service.channels is not None
                             else mig.DEFAULT_CHANNELS)  # multifd, as before the memory-based default
    pf = mig.Preflight(vm_name, vm_uuid, source, target, admin, dt.datetime.now(dt.UTC), (), plan)
    run_id = uuidlib.uuid4().hex[:12]
    entry = service._decision_entry(run_id, pf, plan, allowed=False, bypassed="local pre-flight (test only)")
    run = await service._launch(run_id, pf, plan, entry)
    return await run.wait()
