"""Tiny TCG guests for the lab hosts, and their owner-signed placement policies.

A guest has no disk: it sits in SeaBIOS, which is enough for libvirt, metadata and
live migration. ``random_fill_mib`` loads a blob of random bytes into guest RAM with
QEMU's generic ``loader`` device, so that a migration has real (incompressible) work
to do — progress, bandwidth caps, abort and stall tests need that.

libvirt is used directly here (not through adapters/libvirt.py): the lab is a
blocking root CLI tool, not the console, and it talks to each host's local socket.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from xml.sax.saxutils import escape, quoteattr

if TYPE_CHECKING:
    from .certs import LabPKI
    from .hosts import GuestPlan, HostPlan

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
LOADER_ADDR = 0x1000000  # 16 MiB: above SeaBIOS and the low-memory tables


def blob_path(lab_dir: Path, mib: int) -> Path:
    """A file of ``mib`` MiB of random bytes, shared by all hosts (created once).

    It lives in the lab directory, which every host's mount namespace sees at the
    same path: the destination QEMU of a migration is started with the same
    ``-device loader,file=...`` argument, so the file must exist there too.
    """
    path = lab_dir / "blobs" / f"random-{mib}M.bin"
    if not path.exists() or path.stat().st_size != mib * 1024 * 1024:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(1024 * 1024))
        tmp.replace(path)
    return path


def domain_xml(name: str, *, memory_mib: int = 64, uuid: str | None = None,
               metadata_xml: str = "", random_blob: Path | None = None) -> str:
    """Domain XML for a disk-less TCG guest (migratable: no host devices, no disks)."""
    if random_blob is not None and random_blob.stat().st_size + LOADER_ADDR > memory_mib * 1024 * 1024:
        raise ValueError(f"{random_blob} does not fit in {memory_mib} MiB above 16 MiB")
    qemu_ns = f" xmlns:qemu={quoteattr(QEMU_NS)}" if random_blob is not None else ""
    cmdline = ""
    if random_blob is not None:
        arg = f"loader,file={random_blob},addr={LOADER_ADDR:#x},force-raw=on"
        cmdline = (f"  <qemu:commandline>\n    <qemu:arg value='-device'/>\n"
                   f"    <qemu:arg value={quoteattr(arg)}/>\n  </qemu:commandline>\n")
    meta = f"  <metadata>\n{metadata_xml}\n  </metadata>\n" if metadata_xml else ""
    return (
        f"<domain type='qemu'{qemu_ns}>\n"
        f"  <name>{escape(name)}</name>\n"
        f"  <uuid>{uuid or uuidlib.uuid4()}</uuid>\n"
        f"{meta}"
        f"  <memory unit='MiB'>{memory_mib}</memory>\n"
        "  <vcpu>1</vcpu>\n"
        "  <os><type arch='x86_64' machine='pc'>hvm</type></os>\n"
        "  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>"
        "<on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        "    <emulator>/usr/bin/qemu-system-x86_64</emulator>\n"
        "    <controller type='usb' model='none'/>\n"
        "    <memballoon model='none'/>\n"
        "  </devices>\n"
        f"{cmdline}"
        "</domain>\n"
    )


def policy_metadata(pki: LabPKI, host: HostPlan, guest: GuestPlan, vm_uuid: str) -> str:
    """The owner-signed placement policy as ``<metadata>`` XML, or "" when unavailable.

    The signing code lives in core/policy.py and core/envelope.py; it is imported
    lazily so that the lab still starts (without policies, and ``up`` says so) on a
    checkout where those modules cannot be imported.
    """
    try:
        from console.lab import policies
    except ImportError:  # pragma: no cover - degraded mode, reported by `lab up`
        return ""
    return policies.metadata_for(pki, host, guest, vm_uuid)


def define_guest(conn: Any, name: str, *, memory_mib: int = 64, start: bool = True,
                 metadata_xml: str = "", random_blob: Path | None = None,
                 uuid: str | None = None) -> Any:
    """Define (persistently) and optionally start a guest on an open libvirt connection."""
    dom = conn.defineXML(domain_xml(name, memory_mib=memory_mib, uuid=uuid,
                                    metadata_xml=metadata_xml, random_blob=random_blob))
    if start:
        dom.create()
    return dom
