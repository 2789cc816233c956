"""What crosses the migration network, seen with tcpdump in the destination's namespace.

escort's plan says TLS; these tests check the wire: in every mode escort offers (one
stream, and multifd with several channels), every TCP connection to the destination's
migration ports begins with a TLS handshake on both sides, and the memory itself (far
more bytes than the handshakes) went over those connections. The same capture of a
plaintext migration (issued directly with libvirt, test only) shows QEMU's plaintext
magic, so the check can fail. And with several channels the destination identity is
still pinned: forced past escort's own checks to the rogue host, QEMU refuses its
certificate and the VM stays where it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from console.core import migration as mig
from tests.integration.forced import UncheckedMigrationService, force_unchecked_migration
from tests.integration.test_migration_lab import (
    ADMIN,
    ROGUE,
    SOURCE,
    TARGET,
    _audit,
    _guest,
    _libvirt,
    _only_on,
    _remove,
    _service,
    mig_fleet,  # noqa: F401  (the module fixture, shared)
)
from tests.integration.wire import (
    MULTIFD_PLAIN_MAGIC,
    QEMU_PLAIN_MAGIC,
    TLS_RECORD,
    capture,
    connections,
    describe,
)

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab

FILL = 32  # MiB of random guest RAM: the copy must carry at least this much


@pytest.mark.parametrize("channels", [1, 2])
async def test_escort_migration_is_tls_on_every_connection(lab: Lab, mig_fleet: Path,  # noqa: F811
                                                           tmp_path: Path, channels: int) -> None:
    name = f"wire-{channels}"
    uuid = _guest(lab, mig_fleet, name, fill=FILL)
    try:
        async with _service(mig_fleet, tmp_path, channels=channels) as svc:
            pf = await svc.preflight(name, TARGET, ADMIN)
            assert pf.ok and pf.plan is not None, pf.reasons
            with capture(lab, TARGET, name) as pcap:
                result = await (await svc.start(pf)).wait()
        assert result.outcome.result == "success", result.outcome.message
        _only_on(lab, uuid, TARGET)
        seen = connections(pcap)
        # one main stream, plus one connection per multifd channel
        assert len(seen) == (1 if channels == 1 else channels + 1), (seen, describe(pcap))
        for conn in seen:
            assert conn.client_first.startswith(TLS_RECORD), conn
            assert conn.server_first.startswith(TLS_RECORD), conn
        assert sum(c.client_bytes for c in seen) > FILL * 1024 * 1024  # the memory went over TLS
        decision = _audit(tmp_path)[0]
        assert "TLS" in decision["flags"] and decision["tls_name"] == TARGET
        assert ("PARALLEL" in decision["flags"]) == (channels > 1)
    finally:
        _remove(lab, uuid)


async def test_the_wire_check_sees_a_plaintext_migration(lab: Lab, mig_fleet: Path) -> None:  # noqa: F811
    """Control: the same capture of a migration without TLS (libvirt directly; escort has
    no such path) shows QEMU's plaintext stream — the TLS test above can fail."""
    libvirt = _libvirt()
    uuid = _guest(lab, mig_fleet, "wire-plain", fill=FILL)
    src, dst = lab.open_libvirt(SOURCE), lab.open_libvirt(TARGET)
    try:
        dom = src.lookupByUUIDString(uuid)
        flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PARALLEL
        params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{lab.host(TARGET).migration_ip}",
                  libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS: 2}
        with capture(lab, TARGET, "wire-plain") as pcap:
            dom.migrate3(dst, params, flags)
        seen = connections(pcap)
        assert len(seen) == 3, (seen, describe(pcap))
        firsts = sorted(c.client_first[:4] for c in seen)
        assert firsts == sorted([QEMU_PLAIN_MAGIC, MULTIFD_PLAIN_MAGIC, MULTIFD_PLAIN_MAGIC])
        assert not any(c.client_first.startswith(TLS_RECORD) for c in seen)
    finally:
        src.close()
        dst.close()
        _remove(lab, uuid)


async def test_multifd_still_pins_the_destination(lab: Lab, mig_fleet: Path,  # noqa: F811
                                                  tmp_path: Path) -> None:
    """Forced past escort's checks to the rogue host with several channels: QEMU on the
    source refuses the rogue certificate; the VM keeps running on its source only."""
    uuid = _guest(lab, mig_fleet, "wire-rogue")
    try:
        async with _service(mig_fleet, tmp_path, cls=UncheckedMigrationService, channels=4) as svc:
            result = await force_unchecked_migration(svc, uuid, "wire-rogue", SOURCE, ROGUE, ROGUE,
                                                      admin=ADMIN)
        assert result.plan.flags & mig.MIGRATE_PARALLEL and result.plan.flags & mig.MIGRATE_TLS
        assert result.outcome.result == "failed"
        assert "certificate" in result.outcome.message.lower(), result.outcome.message
        _only_on(lab, uuid, SOURCE)
    finally:
        _remove(lab, uuid)
