"""Live migration in the lab: TLS vs plaintext in the same run, and the pre-flight's cost.

    sudo .venv/bin/python bench/bench_migration.py [--rounds 3] [--memory 256] [--record]

Starts its own lab (``bench``, in a temporary directory; torn down at the end),
defines one guest whose RAM is full of random (incompressible) bytes, and moves it
back and forth between two hosts of different regions (through the jump host, as the
console does): each round one migration with QEMU native TLS through escort's
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
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from console.adapters.audit import AuditLog  # noqa: E402
from console.core.grants import AdminRef, build_grant_payload, sign_grant  # noqa: E402
from console.lab import Lab  # noqa: E402
from console.services.fleet import FleetService  # noqa: E402
from console.services.inventory import InventoryService  # noqa: E402
from console.services.migration import MigrationService, _migrate3  # noqa: E402

A, B = "fra-1", "par-1"
ADMIN = "lab-admin"


def _machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 ** 3)
    load = os.getloadavg()
    return (f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs ({cpu}), {mem} GiB RAM, "
            f"Python {platform.python_version()}, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")


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
            "downtime_ms": float(done.get("downtime", 0))}


async def _run(lab: Lab, memory: int, rounds: int) -> dict[str, Any]:
    uuid = lab.define_guest(A, "bench-vm", memory_mib=memory, random_fill_mib=memory - 32, owner="alice")
    fleet_path = _fleet_with_grant(lab, uuid)
    fleet = FleetService.load_strict(fleet_path)
    assert fleet.spec is not None
    inventory = InventoryService(fleet.spec, apply=fleet.apply_facts)
    svc = MigrationService(fleet, inventory, audit=AuditLog(lab.dir / "bench-audit.log"))
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
                raise SystemExit(f"TLS migration failed: {result.outcome.message}")
            tls.append({"wall": result.outcome.timings["migrate"], "libvirt": result.progress.elapsed_s,
                        "downtime_ms": float(result.outcome.downtime_ms or 0),
                        "end_to_end": time.perf_counter() - t0 + pf.elapsed_s})
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
    return {"tls": tls, "plain": plain, "preflight": preflights}


def _summary(memory: int, rounds: int, res: dict[str, Any]) -> str:
    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    tls_t, plain_t = med(res["tls"], "libvirt"), med(res["plain"], "libvirt")
    pf = res["preflight"]
    lines = [
        f"#### {memory} MiB guest ({memory - 32} MiB random), {rounds} round(s), "
        f"{A} <-> {B} ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        f"Machine: {_machine()}",
        "",
        "| | median migration (libvirt elapsed) | median wall of migrate3 | median downtime |",
        "|---|---|---|---|",
        f"| TLS (escort) | {tls_t:.2f} s | {med(res['tls'], 'wall'):.2f} s | "
        f"{med(res['tls'], 'downtime_ms'):.0f} ms |",
        f"| plaintext (benchmark only) | {plain_t:.2f} s | {med(res['plain'], 'wall'):.2f} s | "
        f"{med(res['plain'], 'downtime_ms'):.0f} ms |",
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
            res = asyncio.run(_run(lab, args.memory, args.rounds))
        finally:
            lab.down()
    text = _summary(args.memory, args.rounds, res)
    print(text)
    if args.record:
        results = ROOT / "bench" / "RESULTS.md"
        with results.open("a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
