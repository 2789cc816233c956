"""Evacuation planning benchmark: 500 VMs on failing hosts, 1,000 candidate hosts.

    python bench/bench_evacuation.py             # the issue's sizes, prints a report
    python bench/bench_evacuation.py --record    # ... and adds it to bench/RESULTS.md
    python bench/bench_evacuation.py --vms 100 --hosts 200   # quick run

Setup (not timed): a CA tree (root, the regional intermediates of bench_matrix.py, a
rogue CA), 1,000 candidate + 5 failing host certificates (some expired, some from the
rogue CA, some expiring within the hour), 50 owners signing 500 ES256 placement
policies drawn from 60 placement rules, and one emergency-only grant per owner for
the admin (one owner's grant names other VMs, so its VMs are stuck on the grant). The
fleet is written to a temporary directory as a real fleet file with trust directories.

Timed, in the order the console does it:
  1. load   — ``FleetService.load_strict``: fleet file, trust stores, host certificate files;
  2. facts  — ``apply_facts`` for every host (what a refresh delivers: memory, vCPUs, the
              failing hosts' domains with their policy tokens);
  3. plan   — ``EvacuationService.plan(explain=False)``: every host chain checked, every
              policy verified (signature, owner chain, dates, VM binding), the
              allowed-target matrix, the admin's grant per VM (in an emergency),
              certificate lifetimes, capacity, placement, the stuck VMs and their owners.
              This is the goal's number (< 1 s): the admin presses "evacuate" right after
              a refresh and nothing was verified before.
  4. explain — ``explain_stuck``: the full decision (``decide``, with its walkthrough) for
              every (stuck VM, candidate host) pair, ~0.1 ms each; reported separately
              because it grows with stuck VMs x hosts (the UI explains the VM opened).
  5. plan again with explanations, warm — what ``escort evacuate`` computes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_matrix import AT, POLICIES, REGIONS
from bench.machine import RESULTS, describe, record
from console.core import grants as gr
from console.core import issuance as iss
from console.core import policy as pol
from console.core.inventory import DomainFacts, HostFacts
from console.services.evacuation import EvacuationService
from console.services.fleet import FleetService

ADMIN = "oncall"
ADMIN_KEY = "SHA256:" + "q" * 43
FAILING = 5


def build(root: Path, n_hosts: int, n_vms: int, n_owners: int, n_shapes: int, seed: int
          ) -> tuple[Path, dict[str, HostFacts]]:
    rng = random.Random(seed)
    start = AT - dt.timedelta(days=100)

    def write(rel: str, data: bytes | str) -> None:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data if isinstance(data, bytes) else data.encode())

    root_key = iss.make_key("ec")
    ca = iss.Issuer(iss.issue_ca(iss.CASpec(iss.Subject("Bench Root", organization="Bench")), root_key,
                                 iss.Validity.days(3650, start=start)), root_key)
    write("trust/hosts/root.pem", iss.cert_pem(ca.cert))
    inters = []
    for name, countries, sites in REGIONS:
        k = iss.make_key("ec")
        cert = iss.issue_ca(iss.CASpec(iss.Subject(f"Region {name}", organization="Bench"), path_len=0,
                                       policies=POLICIES),
                            k, iss.Validity.days(1825, start=start), issuer=ca)
        inters.append((name, iss.Issuer(cert, k), countries, sites))
        write(f"trust/hosts/{name}.pem", iss.cert_pem(cert))
    rogue_key = iss.make_key("ec")
    rogue = iss.Issuer(iss.issue_ca(iss.CASpec(iss.Subject("Rogue CA")), rogue_key,
                                    iss.Validity.days(3650, start=start)), rogue_key)
    host_key = iss.make_key("ec")  # one key for all: key generation is setup cost only
    names: list[str] = []
    toml = ['name = "bench-evacuation"', 'kind = "real"', 'trust_dir = "trust/hosts"',
            'owners_trust_dir = "trust/owners"', 'grants = ["grants"]',
            'missing_crl = "warn"  # the bench CAs publish no CRL (docs/PKI.md)']
    facts: dict[str, HostFacts] = {}
    total = n_hosts + FAILING
    for i in range(total):
        region, issuer, countries, sites = inters[i % len(inters)]
        if i >= FAILING and i % 97 == 0:
            issuer = rogue
        days: float = 365
        if i % 41 == 0:
            days = 30  # expired at AT
        elif i % 53 == 0:
            days = 100.02  # valid at AT for about half an hour: too short for a migration
        spec = iss.HostSpec(f"hv{i:04d}", country=rng.choice(countries), locality=rng.choice(sites),
                            organization="Bench", policies=rng.sample(POLICIES, rng.randint(0, 2)))
        cert = iss.issue_host(spec, host_key, issuer, iss.Validity.days(days, start=start))
        write(f"certs/{spec.hostname}.pem", iss.cert_pem(cert))
        names.append(spec.hostname)
        toml += ["", "[[hosts]]", f'name = "{spec.hostname}"', f'region = "{region}"',
                 f'cert_file = "certs/{spec.hostname}.pem"']
        facts[spec.hostname] = HostFacts(spec.hostname, 512 * 1024, 64, rng.randint(8, 160) * 1024, ())
    ok = iss.make_key("ec")
    owners_ca = iss.Issuer(iss.issue_ca(iss.CASpec(iss.Subject("Bench Owners CA")), ok,
                                        iss.Validity.days(3650, start=start)), ok)
    write("trust/owners/owners.pem", iss.cert_pem(owners_ca.cert))
    owners = []
    for i in range(n_owners):
        k = iss.make_key("ec")
        cert = iss.issue_owner(iss.Subject(f"Owner {i}"), k, owners_ca, iss.Validity.days(730, start=start),
                               email=f"owner{i}@bench.example")
        owners.append((f"owner{i}@bench.example", k, [cert]))
    fps = [(f"Region {r[0]}", r[1].cert.fingerprint(iss.hashes.SHA256()).hex()) for r in inters]
    root_fp = ("Bench Root", ca.cert.fingerprint(iss.hashes.SHA256()).hex())
    shapes = []
    for _ in range(n_shapes):
        r = rng.randrange(len(REGIONS))
        trust = [root_fp] if rng.random() < 0.2 else [fps[r], *rng.sample(fps, rng.randint(0, 2))]
        require: dict[str, list[str]] = {}
        if rng.random() < 0.7:
            require["country"] = rng.sample(REGIONS[r][1], rng.randint(1, len(REGIONS[r][1])))
        if rng.random() < 0.1:
            require["locality"] = ["Atlantis"]  # no host anywhere: these VMs are stuck
        if rng.random() < 0.4:
            require["policies"] = rng.sample(POLICIES, 1)
        shapes.append((trust, require))
    nbf, exp = AT - dt.timedelta(days=10), AT + dt.timedelta(days=355)
    per_owner: dict[int, list[str]] = {}
    domains: dict[str, list[DomainFacts]] = {n: [] for n in names[:FAILING]}
    for i in range(n_vms):
        o = i % n_owners
        email, key, chain = owners[o]
        trust, require = shapes[rng.randrange(n_shapes)]
        u = str(uuid.UUID(int=rng.getrandbits(128)))
        payload = pol.build_policy_payload(owner=email, vm_uuid=u, vm_name=f"vm{i:04d}", trusted_cas=trust,
                                           require=require, not_before=nbf, not_after=exp, jti=f"j{i}")
        token = pol.sign_policy(payload, key, chain)
        domains[names[i % FAILING]].append(DomainFacts(u, f"vm{i:04d}", "running",
                                                       memory_mib=rng.choice([2, 4, 8, 16]) * 1024,
                                                       vcpus=rng.choice([1, 2, 4, 8]), policy_token=token))
        per_owner.setdefault(o, []).append(u)
    for o, uuids in per_owner.items():
        email, key, chain = owners[o]
        covered = uuids if o != 0 else [str(uuid.UUID(int=o + 1))]  # owner 0 granted someone else
        payload = gr.build_grant_payload(owner=email, admin=gr.AdminRef(ADMIN, ADMIN_KEY), vms=covered,
                                         not_before=AT - dt.timedelta(hours=1),
                                         not_after=AT + dt.timedelta(hours=8), emergency_only=True)
        write(f"grants/owner{o}.jws", gr.sign_grant(payload, key, chain))
    toml += ["", "[[admins]]", f'id = "{ADMIN}"', f'ssh_key_fingerprint = "{ADMIN_KEY}"']
    write("fleet.toml", "\n".join(toml) + "\n")
    for n, doms in domains.items():
        facts[n] = HostFacts(n, 512 * 1024, 64, 400 * 1024, tuple(doms))
    return root / "fleet.toml", facts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=500)
    ap.add_argument("--hosts", type=int, default=1000, help="candidate hosts (5 failing hosts are added)")
    ap.add_argument("--owners", type=int, default=50)
    ap.add_argument("--shapes", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="add the report to bench/RESULTS.md")
    args = ap.parse_args()
    where = describe()
    print(f"machine: {where}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-evac-") as tmp:
        t0 = time.perf_counter()
        fleet_path, facts = build(Path(tmp), args.hosts, args.vms, args.owners, args.shapes, args.seed)
        print(f"setup (not timed): {time.perf_counter() - t0:.1f} s", flush=True)
        t0 = time.perf_counter()
        fleet = FleetService.load_strict(fleet_path, at=AT)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        for name, f in facts.items():
            fleet.apply_facts(name, f, None)
        t_facts = time.perf_counter() - t0
        sources = [f"hv{i:04d}" for i in range(FAILING)]
        ev = EvacuationService(fleet, admin=ADMIN)
        t0, c0 = time.perf_counter(), time.process_time()
        planned = ev.plan(sources, explain=False)
        t_plan, c_plan = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        ev.explain_stuck(planned)
        t_explain = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = ev.plan(sources)
        t_again = time.perf_counter() - t0
    stuck_codes: dict[str, int] = {}
    for s in planned.stuck:
        for _host, reasons in s.why_not:
            for r in reasons:
                stuck_codes[r.code] = stuck_codes.get(r.code, 0) + 1
    explained = sum(len(s.why_not) for s in planned.stuck)
    allowed = [len(m.vm.allowed) for m in planned.moves]
    assert len(planned.moves) + len(planned.stuck) + len(planned.held) == args.vms
    assert [m.target for m in again.moves] == [m.target for m in planned.moves]
    goal = (args.vms, args.hosts) == (500, 1000)
    lines = [
        f"#### {args.vms} VMs on {FAILING} failing hosts, {args.hosts:,} candidates "
        f"({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Machine: {where}.",
        f"Result: {len(planned.moves)} moves, {len(planned.stuck)} stuck "
        f"({explained:,} host decisions explained for them), median allowed set "
        f"{sorted(allowed)[len(allowed) // 2] if allowed else 0} hosts; most common refusals: "
        + ", ".join(f"{c} {n:,}" for c, n in sorted(stuck_codes.items(), key=lambda x: -x[1])[:4]) + ".",
        "",
        "| phase | seconds |",
        "|---|---|",
        f"| load fleet file, trust stores, {args.hosts + FAILING} host certificate files | {t_load:.3f} |",
        f"| apply refresh facts ({args.hosts + FAILING} hosts, {args.vms} domains) | {t_facts:.3f} |",
        f"| **plan (cold: chains, policies, matrix, grants, capacity, placement)** | **{t_plan:.3f}** "
        f"(CPU {c_plan:.3f}) |",
        f"| explain the {len(planned.stuck)} stuck VMs (full decision per candidate host) "
        f"| {t_explain:.3f} |",
        f"| plan again with explanations, warm (what `escort evacuate` prints) | {t_again:.3f} |",
        "",
        (f"- Goal (plan < 1 s): {'met' if t_plan < 1 else 'NOT met'} ({t_plan:.2f} s wall, "
         f"{c_plan:.2f} s CPU; the wall time includes waiting for the shared cores)." if goal
         else "- (Not the goal's size.)"),
        "",
    ]
    report = "\n".join(lines)
    print(report)
    if args.record:
        if "### Recorded runs (bench_evacuation.py)" not in RESULTS.read_text():
            record(SECTION)
        record(report, section="### Recorded runs (bench_evacuation.py)")
    return 0


SECTION = """## bench_evacuation.py — evacuation planning, 500 VMs x 1,000 candidate hosts

`python bench/bench_evacuation.py [--record]` writes a real fleet (fleet file, trust
directories, 1,005 host certificates — some expired, some from a rogue CA, some valid
for only half an hour —, 50 owners, 500 ES256 policies from 60 placement rules, one
emergency-only grant per owner) and times what `escort evacuate` does after its live
refresh: loading the fleet, applying the refresh's facts, and planning — every host
chain checked, every policy verified, the allowed-target matrix, the admin's grant per
VM, certificate lifetimes, capacity, placement, and for every stuck VM the full
decision for every candidate host (timed separately: ~0.15 ms per pair, so it dominates
when many VMs are stuck on a big fleet; the console explains the stuck VM it shows).

Where the plan's time goes (profiled): ~60% the 1,005 host chain checks (~0.5 ms each,
mostly certificate parsing), ~30% the 500 policy verifications, the rest grants,
capacity and placement. Repeated runs on this shared machine ranged 0.58–1.0 s wall
(0.5–0.8 s CPU) with a load average around 3. In `escort evacuate` the chains were
already checked once when the refresh delivered the certificates; `FleetService`'s
decision matrix checks them again (a hook reusing the view's chain would remove that).
"""


if __name__ == "__main__":
    sys.exit(main())
