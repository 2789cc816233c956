"""The console's CPU in a cold start-up check with the helper's messages ready (issue 12, u2).

usage: python bench/bench_handover.py FLEET [--at ISO] [--digest FILE]

What the console pays for the hand-over and for deciding, without the helper's timing: a
forked child runs the real helper (``_prefetch_main``) against a recording connection (every
message it would send, pickled as ``Connection.send`` pickles it), then another child sends
those bytes down a real pipe as fast as the console reads them, while this process runs
``check_in_steps`` exactly as the console does (cold: lazy fleet, no snapshot, no opened
cache; the policy memory as it is). The time is fixed (``--at``, default now) so that the
helper's host checks are adopted. Prints this process's CPU from the start of the check to
the last verdict and to the end, the tokens it opened itself (and their CPU, left out of
"net"), and a digest of every verdict (views, policy results, VM checks, matrix) so that two
trees can be compared: run them back to back, e.g. ``PYTHONPATH=/other/tree python ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import hashlib
import multiprocessing
import os
import pickle
import tempfile
import time
from typing import Any

from console.core import envelope as envelope_module
from console.services import fleet as fleet_module
from console.services.fleet import FleetService


class _Recorder:
    """A connection that keeps what is sent (as ``Connection.send`` pickles it)."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, obj: Any) -> None:
        self.sent.append(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        pass


def _record(service: FleetService, path: str) -> None:
    rec = _Recorder()
    fleet_module._prefetch_main(service, rec)  # type: ignore[arg-type]
    with open(path, "wb") as f:
        pickle.dump(rec.sent, f)


def _send(path: str, conn: Any) -> None:
    with open(path, "rb") as f:
        sent = pickle.load(f)
    try:
        for blob in sent:
            conn.send_bytes(blob)
    except OSError:
        pass
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fleet")
    ap.add_argument("--at", default="")
    ap.add_argument("--digest", default="")
    ap.add_argument("--prof", default="", help="write a cProfile of the check here")
    ap.add_argument("--gc-off", action="store_true", help="the cyclic collector off during the check")
    ap.add_argument("--messages", default="", help="the helper's messages: recorded here if the file "
                    "does not exist, else replayed from it (same --at and tree only)")
    a = ap.parse_args()
    at = dt.datetime.fromisoformat(a.at) if a.at else dt.datetime.now(dt.UTC)
    os.environ["ESCORT_NO_CACHE"] = "1"
    s = FleetService.load(a.fleet, eager=False, at=at)
    s.use_cache = False
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as tmp:
        path = a.messages or os.path.join(tmp, "messages")
        if not os.path.exists(path):
            recorder = ctx.Process(target=_record, args=(s, path))
            recorder.start()
            recorder.join()
        receive, send = ctx.Pipe(duplex=False)
        if hasattr(fleet_module, "widen_pipe"):  # (as ``start_prefetch`` makes it)
            fleet_module.widen_pipe(receive)
        sender = ctx.Process(target=_send, args=(path, send))
        sender.start()
        send.close()
        s._prefetch = (sender, receive)  # as ``start_prefetch`` leaves it

        opened = [0, 0.0]
        real_open = envelope_module.open_token

        def counting_open(*args: Any, **kw: Any) -> Any:
            c = time.process_time()
            try:
                return real_open(*args, **kw)
            finally:
                opened[0] += 1
                opened[1] += time.process_time() - c

        envelope_module.open_token = counting_open  # type: ignore[assignment]
        n = 0
        total = len(s._vms)
        views: dict[str, Any] = {}
        if a.gc_off:
            gc.disable()
        prof = None
        if a.prof:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        c0 = time.process_time()
        w0 = time.perf_counter()
        c_last = c0
        own_last = 0.0
        for vs in s.check_in_steps():
            for v in vs:
                views[v.uuid] = v
            n += len(vs)
            if n >= total and c_last == c0:
                c_last = time.process_time()
                own_last = opened[1]
        c1 = time.process_time()
        w1 = time.perf_counter()
        if prof is not None:
            prof.disable()
            prof.dump_stats(a.prof)
        envelope_module.open_token = real_open  # type: ignore[assignment]
        gc.enable()
        sender.join()
    last = (c_last - c0) * 1000
    net = last - own_last * 1000
    print(f"console CPU: to the last verdict {last:.0f} ms, whole check {(c1 - c0) * 1000:.0f} ms "
          f"(wall {(w1 - w0) * 1000:.0f} ms); opened here {opened[0]} tokens, {opened[1] * 1000:.0f} ms; "
          f"net to the last verdict {net:.0f} ms ({net / total * 1000:.1f} us per VM); "
          f"source={s.check_source}; views={n}; load {os.getloadavg()}")
    h = hashlib.sha256()
    gc.collect()

    def canon(x: Any) -> Any:  # (as /work/prof/harness.py: sets sorted, dataclasses by field)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return (type(x).__name__,
                    tuple((f.name, canon(getattr(x, f.name))) for f in dataclasses.fields(x)))
        if isinstance(x, frozenset | set):
            return ("set", tuple(sorted((canon(i) for i in x), key=repr)))
        if isinstance(x, tuple | list):
            return tuple(canon(i) for i in x)
        if isinstance(x, dict):
            return ("dict", tuple(sorted(((canon(k), canon(v)) for k, v in x.items()), key=repr)))
        return x

    def put(x: Any) -> None:
        h.update(repr(canon(x)).encode())
        h.update(b"\0")

    for u, rec in s._vms.items():
        put((views[u], s._policy(rec, at), s._vm_check(rec, at)))
    m = s._matrix
    assert m is not None
    put((sorted(m.targets.items()), sorted(m.at_home), m.groups, m.eligible_hosts))
    put([(p.source, p.reason) for p in s.problems])
    print("verdict digest", h.hexdigest())
    if a.digest:
        with open(a.digest, "w") as f:
            f.write(h.hexdigest() + "\n")


if __name__ == "__main__":
    main()
