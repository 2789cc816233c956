"""Outage drills, many times: every fault at every moment of a live migration, N rounds.

    sudo .venv/bin/python bench/bench_faults.py [--runs 10] [--fault F]... [--moment M]...
                                                [--record] [--jsonl FILE]

Starts its own lab (``bf<pid>``, in a temporary directory; torn down at the end) and
runs console/lab/drills.py's scenario — the same one tests/integration/test_faults_lab.py
runs once — for each fault (kill-libvirtd par-1, kill-qemu par-1, kill-sshd jump,
cut-link par-1) at each moment (target preparing, mid-copy, just after completion),
``--runs`` times (default 10). After each scenario the fault is healed and every
hypervisor's libvirtd is asked directly where the VM is. Counted:

* lost: the VM is defined nowhere or runs nowhere (except kill-qemu after completion,
  where the drill itself kills the migrated VM);
* doubled: the VM is on more than one host after healing and reconcile;
* wrongly reported: escort's outcome disagrees with that truth (moved/stayed when it
  is not so, "unknown" although both hosts answered, "not running" for a host it
  could not ask, an unknown outcome not offered again by reconcile, an audit log that
  does not verify);
* missed: the moment never came (the migration ended first) or the fault was refused.

``--record`` appends the table and the machine to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import describe, record
from console.lab import Lab, drills


async def _run(lab: Lab, args: argparse.Namespace, out: Path | None) -> list[drills.DrillResult]:
    results: list[drills.DrillResult] = []
    n = 0
    for rnd in range(args.runs):
        for fault in args.fault:
            for moment in args.moment:
                n += 1
                name = f"bf-{n}"
                t0 = time.monotonic()
                r = await drills.run_drill(lab, fault, moment, fleet_file=lab.fleet_file,
                                           audit_path=lab.dir / "bench-audit.log", name=name)
                results.append(r)
                flag = ("LOST " if r.lost else "") + ("DOUBLED " if r.doubled else "") + \
                       ("WRONG " if r.wrong else "") + ("missed " if not r.fired else "")
                print(f"round {rnd + 1}/{args.runs} {fault:<13} {moment:<8} {r.result:<8} "
                      f"{r.vm_state:<8} truth {r.truth} {time.monotonic() - t0:5.1f} s {flag}"
                      + (f"{r.problems}" if r.problems else ""), flush=True)
                if out is not None:
                    with out.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps({"round": rnd + 1, **r.as_json()}) + "\n")
    return results


def _table(results: list[dict[str, Any]]) -> str:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in results:
        cells[(r["fault"], r["moment"])].append(r)
    lines = ["| fault | moment | runs | moved | stayed | unknown | lost | doubled | wrongly reported "
             "| missed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (fault, moment), rs in cells.items():
        count = collections.Counter(r["vm_state"] for r in rs)
        lines.append(f"| {fault} | {moment} | {len(rs)} | {count['moved']} | {count['stayed']} | "
                     f"{count['unknown']} | {sum(r['lost'] for r in rs)} | {sum(r['doubled'] for r in rs)} | "
                     f"{sum(r['wrong'] for r in rs)} | {sum(not r['fired'] for r in rs)} |")
    return "\n".join(lines)


def _report(results: list[dict[str, Any]], runs: str, wall_s: float, faults: int, moments: int) -> str:
    lost = sum(r["lost"] for r in results)
    doubled = sum(r["doubled"] for r in results)
    wrong = sum(r["wrong"] for r in results)
    missed = sum(not r["fired"] for r in results)
    return (f"## bench_faults.py — outage drills: {runs} x {faults} faults x {moments} moments "
            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
            f"Machine: {describe()}\n\n"
            f"{len(results)} scenarios in {wall_s / 60:.1f} min: **{lost} VMs lost, {doubled} doubled, "
            f"{wrong} wrongly reported**; {missed} missed (moment not reached or fault refused; "
            "not counted as passes).\n\n" + _table(results) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--fault", action="append", choices=drills.FAULT_MATRIX)
    ap.add_argument("--moment", action="append", choices=drills.MOMENTS)
    ap.add_argument("--record", action="store_true")
    ap.add_argument("--jsonl", type=Path, default=None, help="append every scenario as JSON here")
    ap.add_argument("--summarize", type=Path, default=None, metavar="JSONL",
                    help="only summarize a --jsonl file of an earlier (possibly interrupted) run")
    args = ap.parse_args()
    if args.summarize is not None:
        rows = [json.loads(line) for line in args.summarize.read_text().splitlines() if line.strip()]
        rounds = max((r["round"] for r in rows), default=0)
        full = sum(1 for rnd in range(1, rounds + 1)
                   if sum(r["round"] == rnd for r in rows) == len(drills.FAULT_MATRIX) * len(drills.MOMENTS))
        report = _report(rows, f"{full} complete round(s) ({len(rows)} scenarios)", 0.0,
                         len({r["fault"] for r in rows}), len({r["moment"] for r in rows}))
        report = report.replace(" in 0.0 min", "")
        print(report)
        if args.record:
            record(report)
        return 0
    args.fault = args.fault or list(drills.FAULT_MATRIX)
    args.moment = args.moment or list(drills.MOMENTS)
    with tempfile.TemporaryDirectory(prefix="escort-bench-faults-") as tmp:
        lab = Lab(Path(tmp) / "lab", f"bf{os.getpid() % 0xfffff:x}")
        t0 = time.monotonic()
        lab.up()
        try:
            results = asyncio.run(_run(lab, args, args.jsonl))
        finally:
            lab.down()
        wall = time.monotonic() - t0
    rows = [r.as_json() for r in results]
    report = _report(rows, f"{args.runs} run(s)", wall, len(args.fault), len(args.moment))
    print(report)
    if args.record:
        record(report)
    bad = any(r["lost"] or r["doubled"] or r["wrong"] or not r["fired"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
