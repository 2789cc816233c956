"""Live migration in the lab: TLS vs plaintext in the same run, and the pre-flight's cost.

    sudo .venv/bin/python bench/bench_migration.py [--guest random|linux] [--rounds 3]
                                                   [--memory 256] [--record]

Starts its own lab (``bench``, in a temporary directory; torn down at the end),
defines one guest and moves it
back and forth between two hosts of different regions (through the jump host, as the
console does). The guest is either

* ``random`` (default): a BIOS-only guest whose RAM holds a blob of random
  (incompressible) bytes — nothing changes while it migrates; or
* ``linux``: a tiny Linux (Debian's cloud kernel and a busybox initramfs, booted
  directly) that fills 64 MiB of tmpfs with random bytes and then keeps rewriting a
  16 MiB hot set from /dev/urandom, so the migration has dirty pages to chase
  (several passes). The kernel and busybox are fetched once with ``apt-get download``
  (Debian packages linux-image-cloud-amd64's kernel and busybox-static; nothing is
  installed) into /var/cache/escort-bench.

Each round: each round one migration with QEMU native TLS through escort's
MigrationService (pre-flight, audit, verify — the real path) and one *without* TLS
issued directly with libvirt on the same connections.

The plaintext migration exists here only, to measure what TLS costs; escort never
offers it (``MigrationPlan`` cannot be built without TLS).

Reported per migration: libvirt's own elapsed time and downtime
(``jobStats(COMPLETED)`` on the destination), the wall time of ``migrate3``, and for
the TLS path the pre-flight time (what the console adds before anything starts).
``--record`` appends the result to bench/RESULTS.md with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid as uuidlib
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.machine import describe, record  # noqa: E402
from console.adapters.audit import AuditLog  # noqa: E402
from console.core.grants import AdminRef, build_grant_payload, sign_grant  # noqa: E402
from console.lab import Lab  # noqa: E402
from console.services.fleet import FleetService  # noqa: E402
from console.services.inventory import InventoryService  # noqa: E402
from console.services.migration import MigrationService, _migrate3  # noqa: E402

A, B = "fra-1", "par-1"
ADMIN = "lab-admin"
CACHE = Path("/var/cache/escort-bench")
INIT = """#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t tmpfs -o size=200m tmpfs /mnt
/bin/busybox echo "escort-guest: filling" > /dev/ttyS0
/bin/busybox dd if=/dev/urandom of=/mnt/fill bs=1M count=64 2>/dev/null
/bin/busybox echo "escort-guest: dirtying" > /dev/ttyS0
while true; do
  /bin/busybox dd if=/dev/urandom of=/mnt/hot bs=1M count=16 conv=notrunc 2>/dev/null
done
"""


def linux_files(cache: Path = CACHE) -> tuple[Path, Path]:
    """(kernel, initramfs) for the dirtying guest; fetched and built once."""
    kernel = next(iter(sorted(cache.glob("x/boot/vmlinuz-*"))), None)
    initrd = cache / "initrd.gz"
    if kernel is not None and initrd.exists():
        return kernel, initrd
    cache.mkdir(parents=True, exist_ok=True)
    deps = subprocess.run(["apt-cache", "depends", "linux-image-cloud-amd64"], capture_output=True,
                          text=True, check=True).stdout
    image = next(line.split(":", 1)[1].strip() for line in deps.splitlines()
                 if line.strip().startswith("Depends: linux-image-"))
    subprocess.run(["apt-get", "download", image, "busybox-static"], cwd=cache, check=True,
                   capture_output=True)
    for deb in cache.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "x")], check=True)
    root = cache / "initramfs"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "dev", "proc", "mnt"):
        (root / d).mkdir(parents=True)
    shutil.copy2(cache / "x" / "bin" / "busybox", root / "bin" / "busybox")
    (root / "init").write_text(INIT)
    (root / "init").chmod(0o755)
    names = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    archive = subprocess.run([str(root / "bin" / "busybox"), "cpio", "-o", "-H", "newc"], cwd=root,
                             input=names, capture_output=True, check=True).stdout
    initrd.write_bytes(gzip.compress(archive, compresslevel=1))
    kernel = next(iter(sorted(cache.glob("x/boot/vmlinuz-*"))))
    return kernel, initrd


def define_linux_guest(lab: Lab, host: str, name: str, memory: int) -> str:
    """Define and boot the dirtying Linux guest (with alice's policy); wait until it dirties."""
    from console.lab import certs, guests
    from console.lab.hosts import GuestPlan

    kernel, initrd = linux_files()
    uuid = str(uuidlib.uuid4())
    pki = lab.pki or certs.load(lab.pki_dir)
    plan = lab.host(host).plan
    assert plan is not None
    meta = guests.policy_metadata(pki, plan, GuestPlan(name, "alice"), uuid)
    serial = lab.dir / f"{name}-serial.log"
    xml = (f"<domain type='qemu'><name>{escape(name)}</name><uuid>{uuid}</uuid>"
           f"<metadata>{meta}</metadata><memory unit='MiB'>{memory}</memory><vcpu>1</vcpu>"
           f"<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel>"
           f"<initrd>{initrd}</initrd><cmdline>console=ttyS0 quiet panic=-1</cmdline></os>"
           "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
           "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
           "<controller type='usb' model='none'/><memballoon model='none'/>"
           f"<serial type='file'><source path='{serial}' append='on'/></serial></devices></domain>")
    conn = lab.open_libvirt(host)
    try:
        conn.defineXML(xml).create()
    finally:
        conn.close()
    deadline = time.monotonic() + 120
    while "escort-guest: dirtying" not in (serial.read_text(errors="replace") if serial.exists() else ""):
        if time.monotonic() > deadline:
            raise SystemExit(f"the Linux guest did not start dirtying memory (see {serial})")
        time.sleep(0.5)
    return uuid


def _fleet_with_grant(lab: Lab, vm_uuid: str) -> Path:
    from console.lab import certs

    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    grants = lab.dir / "bench-grants"
    grants.mkdir(exist_ok=True)
    doc["grants"] = ["bench-grants"]
    fp = next(a["ssh_key_fingerprint"] for a in doc["admins"] if a["id"] == ADMIN)
    pki = lab.pki or certs.load(lab.pki_dir)
    owner = pki.owners["alice"]
    now = dt.datetime.now(dt.UTC)
    payload = build_grant_payload(owner="alice", admin=AdminRef(ADMIN, ssh_key=fp), vms=[vm_uuid],
                                  not_before=now - dt.timedelta(minutes=5),
                                  not_after=now + dt.timedelta(hours=2))
    (grants / "bench.jws").write_text(sign_grant(payload, owner.key, [owner.cert]))
    path = lab.dir / "fleet-bench.toml"
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


async def _plain(svc: MigrationService, uuid: str, source: str, target: str) -> dict[str, float]:
    """The same migration without TLS (benchmark only), on the service's connections."""
    import libvirt

    src = await svc.inventory.libvirt(source)
    dst = await svc.inventory.libvirt(target)
    dom = await src.call(src.conn.lookupByUUIDString, uuid)
    spec = svc.inventory.spec(target)
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
             | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    params = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{spec.migration_address}"}
    t0 = time.perf_counter()
    new_dom, err = await asyncio.get_running_loop().run_in_executor(None, _migrate3, dom, dst.conn,
                                                                    params, flags)
    wall = time.perf_counter() - t0
    if new_dom is None:
        raise SystemExit(f"plaintext migration failed: {err}")
    done = await dst.call(new_dom.jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    return {"wall": wall, "libvirt": done.get("time_elapsed", 0) / 1000.0,
            "downtime_ms": float(done.get("downtime", 0)), "passes": float(done.get("memory_iteration", 0))}


async def _run(lab: Lab, memory: int, rounds: int, guest: str) -> dict[str, Any]:
    if guest == "linux":
        uuid = define_linux_guest(lab, A, "bench-vm", memory)
    else:
        uuid = lab.define_guest(A, "bench-vm", memory_mib=memory, random_fill_mib=memory - 32,
                                owner="alice")
    fleet_path = _fleet_with_grant(lab, uuid)
    fleet = FleetService.load_strict(fleet_path)
    assert fleet.spec is not None
    inventory = InventoryService(fleet.spec, apply=fleet.apply_facts)
    audit = AuditLog(lab.dir / "bench-audit.log")
    svc = MigrationService(fleet, inventory, audit=audit)
    tls: list[dict[str, float]] = []
    plain: list[dict[str, float]] = []
    preflights: list[float] = []
    here = A
    try:
        for i in range(rounds):
            there = B if here == A else A
            # TLS, through the real path (pre-flight, audit, migrate3, verify)
            pf = await svc.preflight("bench-vm", there, ADMIN)
            if not pf.ok:
                raise SystemExit(f"pre-flight refused: {[r.message for r in pf.reasons]}")
            preflights.append(pf.elapsed_s)
            t0 = time.perf_counter()
            run = await svc.start(pf)
            result = await run.wait()
            if result.outcome.result != "success":
                log = lab.dir / "bench-vm-serial.log"
                tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
                raise SystemExit(f"TLS migration failed: {result.outcome.message}\n{tail}")
            tls.append({"wall": result.outcome.timings["migrate"], "libvirt": result.progress.elapsed_s,
                        "downtime_ms": float(result.outcome.downtime_ms or 0),
                        "end_to_end": time.perf_counter() - t0 + pf.elapsed_s,
                        "passes": float(result.progress.iteration)})
            print(f"round {i + 1}: TLS   {here}->{there} {tls[-1]['libvirt']:.2f} s "
                  f"(downtime {tls[-1]['downtime_ms']:.0f} ms, pre-flight {pf.elapsed_s * 1000:.0f} ms)",
                  flush=True)
            # the same move back, without TLS
            p = await _plain(svc, uuid, there, here)
            plain.append(p)
            print(f"round {i + 1}: plain {there}->{here} {p['libvirt']:.2f} s "
                  f"(downtime {p['downtime_ms']:.0f} ms)", flush=True)
            for name, r in (await inventory.refresh([here, there])).items():
                fleet.apply_facts(name, r.facts, r.problem)
    finally:
        await svc.close()
        await inventory.close()
        audit.close()
    return {"tls": tls, "plain": plain, "preflight": preflights}


def _summary(memory: int, rounds: int, res: dict[str, Any], guest: str) -> str:
    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    tls_t, plain_t = med(res["tls"], "libvirt"), med(res["plain"], "libvirt")
    what = (f"{memory} MiB Linux guest dirtying memory (64 MiB random + a 16 MiB hot set rewritten),"
            if guest == "linux" else f"{memory} MiB guest ({memory - 32} MiB random),")
    pf = res["preflight"]
    lines = [
        f"#### {what} {rounds} round(s), "
        f"{A} <-> {B} ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        f"Machine: {describe()}",
        "",
        "| | median migration (libvirt elapsed) | median wall of migrate3 | median downtime "
        "| median passes |",
        "|---|---|---|---|---|",
        f"| TLS (escort) | {tls_t:.2f} s | {med(res['tls'], 'wall'):.2f} s | "
        f"{med(res['tls'], 'downtime_ms'):.0f} ms | {med(res['tls'], 'passes'):.0f} |",
        f"| plaintext (benchmark only) | {plain_t:.2f} s | {med(res['plain'], 'wall'):.2f} s | "
        f"{med(res['plain'], 'downtime_ms'):.0f} ms | {med(res['plain'], 'passes'):.0f} |",
        "",
        f"TLS / plaintext: **{tls_t / plain_t:.2f}x** "
        f"({memory / tls_t:.0f} vs {memory / plain_t:.0f} MiB/s of guest RAM).",
        f"Pre-flight (refresh both hosts over SSH, decision, read and pin the target certificate): "
        f"first {pf[0] * 1000:.0f} ms, then median {statistics.median(pf[1:] or pf) * 1000:.0f} ms; "
        f"end to end for a TLS move (pre-flight + audit + migrate + verify) median "
        f"{med(res['tls'], 'end_to_end'):.2f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", choices=("random", "linux"), default="random",
                    help="random: BIOS guest with random RAM; linux: a tiny Linux that dirties memory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (>= 64)")
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    if args.memory < 64:
        raise SystemExit("--memory must be at least 64")
    with tempfile.TemporaryDirectory(prefix="escort-bench-") as tmp:
        lab = Lab(Path(tmp) / "lab", "bench")
        up = lab.up()
        print(f"lab up in {up.seconds:.1f} s", flush=True)
        try:
            res = asyncio.run(_run(lab, args.memory, args.rounds, args.guest))
        finally:
            lab.down()
    text = _summary(args.memory, args.rounds, res, args.guest)
    print(text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
