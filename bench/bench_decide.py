"""The console's CPU per VM decided in a cold start-up check (issue 12, s3).

usage: python bench/bench_decide.py FLEET [--reps N]

Loads FLEET as the console does (lazy), reads every policy file, opens every token as the
start-up helper does (``open_portable``, pickled and adopted like its chunks), checks every
host chain, and then times ``_check_in_steps`` without a helper and without caches: what is
left is the per-VM part (``decide``: policy check at AT, VM check, matrix row, view) plus the
host index. Per-VM results are forgotten before each repetition (policy, body, owner-chain
and shape memos), as in a cold start; the cyclic collector is off while a repetition runs
(as ``check_in_steps`` runs the check). Prints CPU per VM for each repetition (the first one
also pays for fresh memory) and the load average: compare two trees back to back, e.g.
``PYTHONPATH=/path/to/other/tree python bench/bench_decide.py ...``.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import time

from console.core import policy as policy_module
from console.core.envelope import TYP_POLICY, open_portable
from console.core.policy import POLICY_FIELDS
from console.services.fleet import FleetService


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fleet")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    s = FleetService.load(a.fleet, eager=False)
    s.use_cache = False
    for _ in s._read_tokens(time.perf_counter(), 1e9):
        pass
    tokens = list(dict.fromkeys(r.token for r in s._vms.values() if r.token))
    env = s._policies.envelopes
    portables = pickle.loads(pickle.dumps(open_portable(tokens, TYP_POLICY, POLICY_FIELDS)))
    for token, portable in zip(tokens, portables, strict=True):
        env.adopt(token, TYP_POLICY, portable)
    at = s.at
    for name in s._hosts:
        s._host_check(name, at)
    s._fixed_at = at
    per_vm = []
    for i in range(a.reps):
        s._policy_cache.clear()
        s._vm_checks.clear()
        s._policies._results.clear()
        s._policies._bodies.clear()
        s._noted.clear()
        s._noted_windows.clear()
        s._noted_chains.clear()
        for memo in ("_chains", "_owners", "_signed"):
            getattr(env, memo, {}).clear()
        policy_module._SHAPES.clear()
        policy_module._SUMMARIES.clear()
        s._matrix = None
        gc.collect()
        gc.freeze()
        gc.disable()
        c0 = time.process_time()
        n = sum(len(v) for v in s._check_in_steps())
        c1 = time.process_time()
        gc.enable()
        gc.unfreeze()
        per_vm.append((c1 - c0) / n * 1e6)
        print(f"rep {i}: {n} VMs decided, {(c1 - c0) * 1000:.0f} ms CPU, {per_vm[-1]:.1f} us per VM",
              flush=True)
    print(f"first {per_vm[0]:.1f} us/VM, best {min(per_vm):.1f} us/VM; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
