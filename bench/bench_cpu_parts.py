"""CPU of the two unit costs of a cold start: one host chain check and one opened token.

    python bench/bench_cpu_parts.py                  # CPU per item, min over --rounds
    python bench/bench_cpu_parts.py --only hosts --loop 100   # one pass, for callgrind:

    valgrind --tool=callgrind --toggle-collect='*functools_reduce*' --callgrind-out-file=/dev/null \\
        python bench/bench_cpu_parts.py --only hosts --loop 100 --hosts 101 --tokens 10
    # "Collected" / 100 = instructions per host check (2.22 M after issue 12 r4, 2.72 M before)

A host check is what the console's helper does per host (``pki.load_certificate`` +
``TrustStore.verify_host`` + ``pki.host_attributes`` + ``HostCheck.prepare``), an opened
token is ``envelope.open_token`` of an ES256 policy (signature, header, schema). Both on
bench_matrix's generated fleet (same generator, smaller by default). CPU time is noisy on
a shared machine (record the load it prints); the instruction count under callgrind is
not, which is how bench/RESULTS.md ("Issue 12 (r4)") compares before and after. Work is
run inside ``functools.reduce`` only so that callgrind can count exactly that part.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import bench_matrix as bm
from console.core import envelope, pki
from console.core.decisions import HostCheck
from console.core.policy import POLICY_FIELDS


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=300)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7, help="timed passes; the minimum is reported")
    ap.add_argument("--only", choices=["hosts", "tokens"], default=None)
    ap.add_argument("--loop", type=int, default=0, help="one untimed pass over this many items (callgrind)")
    args = ap.parse_args()

    f = bm.build(args.hosts, args.tokens, 10, 50, "ec", 1)
    store, _ = pki.TrustStore.build(f.ca_pems, at=bm.AT, missing_crl="warn")
    tokens = [t for _, _, t in f.vms]

    def host(_: object, item: Any) -> object:
        name, pem = item
        cert = pki.load_certificate(pem, name)
        return HostCheck.prepare(name, store.verify_host(cert, bm.AT), pki.host_attributes(cert))

    def token(_: object, t: Any) -> object:
        return envelope.open_token(t, envelope.TYP_POLICY, POLICY_FIELDS)

    # warm-up: per-CA paths and per-owner header checks, computed once in a real run too
    host(None, f.host_pems[-1])
    token(None, tokens[-1])
    kinds = [args.only] if args.only else ["hosts", "tokens"]
    if args.loop:
        for kind in kinds:
            items: list[Any] = list(f.host_pems) if kind == "hosts" else tokens
            functools.reduce(host if kind == "hosts" else token, items[:args.loop], None)
        return 0
    for kind in kinds:
        items = list(f.host_pems) if kind == "hosts" else tokens
        best = float("inf")
        for _ in range(args.rounds):
            store._signatures.clear()  # every round checks every signature again
            store._cache.clear()
            envelope._DIGESTS.clear()
            t0 = time.process_time()
            functools.reduce(host if kind == "hosts" else token, items, None)
            best = min(best, time.process_time() - t0)
        print(f"{kind}: {best / len(items) * 1e6:.0f} us CPU per item (min of {args.rounds} passes over "
              f"{len(items)}), load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
