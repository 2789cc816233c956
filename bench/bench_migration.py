"""Live migration in the lab: plaintext, TLS on one stream and TLS multifd in one run,
the pre-flight's cost, and where the wall time of ``migrate3`` goes.

    sudo .venv/bin/python bench/bench_migration.py [--guest random|linux] [--rounds 5]
                                                   [--memory 256] [--channels 2,4]
                                                   [--name bench] [--record]

(the defaults are the run the goal is judged on: ``sudo .venv/bin/python
bench/bench_migration.py --record`` on a quiet machine)

Starts its own lab (``--name``, default ``bench``, in a temporary directory; torn down at
the end), defines one guest and moves it back and forth between two hosts of different
regions (through the jump host, as the console does). The guest is either

* ``random`` (default): a BIOS-only guest whose RAM holds a blob of random
  (incompressible) bytes — nothing changes while it migrates; or
* ``linux``: a tiny Linux (Debian's cloud kernel and a busybox initramfs, booted
  directly) that fills 64 MiB of tmpfs with random bytes and then keeps rewriting a
  16 MiB hot set from /dev/urandom, so the migration has dirty pages to chase
  (several passes). The kernel and busybox are fetched once with ``apt-get download``
  (Debian packages linux-image-cloud-amd64's kernel and busybox-static; nothing is
  installed) into /var/cache/escort-bench.

Each round, in an order that rotates from round to round (so a load change on the
shared machine does not always hit the same mode):

* one move through escort's MigrationService — pre-flight, just-in-time checks, signed
  audit entry, ``migrate3`` with escort's default channel count, verification: the
  real path;
* the same move issued directly with libvirt on the same (SSH-forwarded) connections,
  once per mode: plaintext on one stream (benchmark only: escort never offers it),
  plaintext multifd with escort's default channel count (the same settings as the
  default TLS move, benchmark only), TLS on one stream, and TLS multifd
  (``VIR_MIGRATE_PARALLEL``) with each ``--channels`` count.

Reported per mode: the wall time of ``migrate3``, libvirt's own elapsed time and
downtime (``jobStats(COMPLETED)`` on the destination: from Begin, so it includes
starting the destination QEMU), and libvirt's phases read from its client debug log
(this process only): Begin, Prepare (the destination starts its QEMU), Perform (the
memory copy), Finish (the destination resumes the VM), Confirm (the source stops its
QEMU). Ratios are to plaintext in the same run. ``--record`` appends the result to
bench/RESULTS.md with the machine.

Also per mode, the CPU the two QEMUs used during ``migrate3`` (read from /proc every
0.2 s: the lab's QEMUs are processes of this machine), split by QEMU's thread names —
source: the migration thread (``live_migration``) and the multifd senders; destination:
the main thread (QEMU start-up and, on one stream, the whole incoming stream) and the
multifd receivers — and how busy the whole machine was meanwhile (/proc/stat). CPU
seconds are far less noisy than wall times on a shared machine, and a machine busy
~100% says the wall time measured contention, not the migration.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import uuid as uuidlib
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# libvirt's client library logs each migration phase (Begin3, Prepare3, ...) at debug level
# from libvirt-domain.c: this process only, before libvirt is loaded.
CLIENT_LOG = Path(tempfile.gettempdir()) / f"escort-bench-libvirt-{os.getpid()}.log"
if __name__ == "__main__":  # run as the benchmark, not when imported for its helpers
    os.environ["LIBVIRT_LOG_OUTPUTS"] = f"1:file:{CLIENT_LOG}"
    os.environ["LIBVIRT_LOG_FILTERS"] = "1:libvirt.domain 4:*"
from bench.machine import describe, record  # noqa: E402
from console.adapters.audit import AuditLog  # noqa: E402
from console.core import migration as mig  # noqa: E402
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


_PHASE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\+0000: \d+: debug : "
                    r"virDomainMigrateVersion3Full:\d+ : (Begin3|Prepare3|Perform3|Finish3|Confirm3) ")


def _phases(offset: int, wall: float) -> dict[str, float]:
    """libvirt's phases of the one migrate3 logged after ``offset`` (seconds each); the
    last (Confirm) ends where migrate3 returned: Begin3 is logged as the call starts."""
    try:
        with CLIENT_LOG.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return {}
    seen: dict[str, float] = {}
    for line in text.splitlines():
        m = _PHASE.match(line)
        if m:
            when = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=dt.UTC)
            seen.setdefault(m.group(2), when.timestamp())
    order = ["Begin3", "Prepare3", "Perform3", "Finish3", "Confirm3"]
    if any(k not in seen for k in order):
        return {}
    marks = [seen[k] for k in order] + [seen["Begin3"] + wall]
    return {name: max(0.0, marks[i + 1] - marks[i]) for i, name in
            enumerate(("begin", "prepare", "perform", "finish", "confirm"))}


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / hz, sum(fields) / hz


def _thread_group(comm: str, main: bool) -> str:
    if comm == "live_migration":
        return "migration"
    if comm.startswith("multifdsend"):
        return "senders"
    if comm.startswith("multifdrecv"):
        return "receivers"
    return "main" if main else "other"


class CpuSampler(threading.Thread):
    """CPU of the QEMU processes running guest ``name`` while a migration runs.

    QEMUs present at the start are the source; any that appears later is the
    destination. Per-thread CPU (utime + stime) is read every ``interval`` seconds; a
    process's last reading before it exits is what counts (the source exits in Confirm,
    after the copy). The destination starts from zero (it did not exist before)."""

    def __init__(self, name: str, interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="cpu-sampler")
        self.tag = f"guest={name},".encode()
        self.interval = interval
        self.halt = threading.Event()
        self.source: set[int] = set()
        self.first: dict[tuple[int, int], float] = {}
        self.last: dict[tuple[int, int], tuple[str, float]] = {}
        self.hz = os.sysconf("SC_CLK_TCK")
        self.busy0 = self.busy1 = (0.0, 0.0)

    def _pids(self) -> list[int]:
        out = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if b"qemu-system" in cmd and self.tag in cmd:
                out.append(int(entry.name))
        return out

    def _read(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as fh:
                        stat = fh.read()
                except OSError:
                    continue
                comm = stat[stat.index("(") + 1:stat.rindex(")")]
                fields = stat[stat.rindex(")") + 2:].split()
                cpu = (int(fields[11]) + int(fields[12])) / self.hz
                key = (pid, int(tid))
                if key not in self.first:
                    self.first[key] = cpu if pid in self.source else 0.0
                self.last[key] = (comm, cpu)

    def start(self) -> None:
        self.source = set(self._pids())
        self._read(sorted(self.source))
        self.busy0 = _machine_busy()
        super().start()

    def run(self) -> None:
        pids = sorted(self.source)
        n = 0
        while not self.halt.wait(self.interval):
            n += 1
            if n % 3 == 1:  # new processes (the destination) appear once; look now and then
                pids = self._pids()
            self._read(pids)

    def stop(self) -> dict[str, float]:
        self.busy1 = _machine_busy()
        self.halt.set()
        self.join()
        self._read(self._pids())
        out: dict[str, float] = {}
        for (pid, tid), (comm, cpu) in self.last.items():
            side = "src" if pid in self.source else "dst"
            key = f"cpu_{side}_{_thread_group(comm, pid == tid)}"
            out[key] = out.get(key, 0.0) + max(0.0, cpu - self.first[(pid, tid)])
        for side in ("src", "dst"):
            out[f"cpu_{side}"] = sum(v for k, v in out.items() if k.startswith(f"cpu_{side}_"))
        busy, total = self.busy1[0] - self.busy0[0], self.busy1[1] - self.busy0[1]
        out["machine_busy"] = busy / total if total > 0 else float("nan")
        return out


def _log_offset() -> int:
    try:
        return CLIENT_LOG.stat().st_size
    except OSError:
        return 0


async def _direct(svc: MigrationService, uuid: str, source: str, target: str, *, tls: bool,
                  channels: int) -> dict[str, float]:
    """One migration issued directly with libvirt on the service's connections (no escort
    checks, no polling): plaintext (benchmark only), or TLS with 1..n channels."""
    import libvirt

    src = await svc.inventory.libvirt(source)
    dst = await svc.inventory.libvirt(target)
    dom = await src.call(src.conn.lookupByUUIDString, uuid)
    spec = svc.inventory.spec(target)
    flags = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PERSIST_DEST
             | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
    params: dict[str, Any] = {libvirt.VIR_MIGRATE_PARAM_URI: f"tcp://{spec.migration_address}"}
    if tls:
        flags |= libvirt.VIR_MIGRATE_TLS
        params[libvirt.VIR_MIGRATE_PARAM_TLS_DESTINATION] = target
    if channels > 1:
        flags |= libvirt.VIR_MIGRATE_PARALLEL
        params[libvirt.VIR_MIGRATE_PARAM_PARALLEL_CONNECTIONS] = channels
    offset = _log_offset()
    cpu = CpuSampler(dom.name())
    cpu.start()
    t0 = time.perf_counter()
    new_dom, err = await asyncio.get_running_loop().run_in_executor(None, _migrate3, dom, dst.conn,
                                                                    params, flags)
    wall = time.perf_counter() - t0
    used = cpu.stop()
    if new_dom is None:
        raise SystemExit(f"{'TLS' if tls else 'plaintext'} migration ({channels} channel(s)) failed: {err}")
    done = await dst.call(new_dom.jobStats, libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    return {"wall": wall, "libvirt": done.get("time_elapsed", 0) / 1000.0,
            "downtime_ms": float(done.get("downtime", 0)), "passes": float(done.get("memory_iteration", 0)),
            **_phases(offset, wall), **used}


PLAIN = "plaintext"


def _plain_same(default: int) -> str:
    return f"plaintext multifd, {default} channels"


def _tls_name(n: int) -> str:
    return "TLS, one stream" if n <= 1 else f"TLS multifd, {n} channels"


def _modes(channels: list[int], default: int = mig.DEFAULT_CHANNELS) -> list[tuple[str, bool, int]]:
    """plaintext one stream, plaintext with escort's default channels (same settings as the
    default TLS move), TLS one stream, TLS with each ``channels`` count (and the default)."""
    tls = sorted({1, default, *channels})
    plain = [(PLAIN, False, 1)] + ([(_plain_same(default), False, default)] if default > 1 else [])
    return [*plain, *((_tls_name(n), True, n) for n in tls)]


async def _escort_move(svc: MigrationService, lab: Lab, here: str, there: str) -> dict[str, float]:
    pf = await svc.preflight("bench-vm", there, ADMIN)
    if not pf.ok:
        raise SystemExit(f"pre-flight refused: {[r.message for r in pf.reasons]}")
    offset = _log_offset()
    cpu = CpuSampler("bench-vm")
    cpu.start()
    t0 = time.perf_counter()
    run = await svc.start(pf)
    result = await run.wait()
    t_end = time.perf_counter()
    used = cpu.stop()
    if result.outcome.result != "success":
        log = lab.dir / "bench-vm-serial.log"
        tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
        raise SystemExit(f"TLS migration failed: {result.outcome.message}\n{tail}")
    timings = result.outcome.timings
    phases = _phases(offset, timings["migrate"])
    row = {"wall": timings["migrate"], "libvirt": result.progress.elapsed_s,
           "downtime_ms": float(result.outcome.downtime_ms or 0), "passes": float(result.progress.iteration),
           "preflight": pf.elapsed_s, "end_to_end": t_end - t0 + pf.elapsed_s,
           # escort's own time in the run: start() to the outcome, minus migrate3 itself
           "own": (t_end - t0) - timings["migrate"], **phases, **used}
    return row


async def _run(lab: Lab, memory: int, rounds: int, guest: str, channels: list[int]) -> dict[str, Any]:
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
    escort_n = mig.default_channels(memory)  # what escort picks for this guest by itself
    modes = _modes(channels, escort_n)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in modes}
    rows["escort"] = []
    preflights: list[float] = []
    here = A
    try:
        # one warm-up pre-flight (cold SSH and libvirt connections): reported apart
        cold = await svc.preflight("bench-vm", B, ADMIN)
        for i in range(rounds):
            steps: list[Any] = ["escort", *modes]
            k = i % len(steps)
            for step in steps[k:] + steps[:k]:
                there = B if here == A else A
                if step == "escort":
                    row = await _escort_move(svc, lab, here, there)
                    preflights.append(row["preflight"])
                    rows["escort"].append(row)
                    label = f"escort (TLS, {escort_n} channel(s))"
                else:
                    label, tls, n = step
                    row = await _direct(svc, uuid, here, there, tls=tls, channels=n)
                    rows[label].append(row)
                print(f"round {i + 1}: {label:32} {here}->{there} wall {row['wall']:.2f} s, "
                      f"libvirt {row['libvirt']:.2f} s, copy {row.get('perform', 0):.2f} s, "
                      f"downtime {row['downtime_ms']:.0f} ms; CPU source {row['cpu_src']:.2f} s, "
                      f"destination {row['cpu_dst']:.2f} s, machine busy {row['machine_busy']:.0%}, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                here = there
                for name, r in (await inventory.refresh([A, B])).items():
                    fleet.apply_facts(name, r.facts, r.problem)
    finally:
        await svc.close()
        await inventory.close()
        audit.close()
    return {"rows": rows, "modes": [m[0] for m in modes], "preflight": preflights,
            "preflight_cold": cold.elapsed_s, "escort_channels": escort_n,
            "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def _summary(memory: int, rounds: int, res: dict[str, Any], guest: str, load_before: str) -> str:
    def med(rows: list[dict[str, float]], key: str) -> float:
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else float("nan")

    rows = res["rows"]
    plain = rows[PLAIN]
    default = res["escort_channels"]
    what = (f"{memory} MiB Linux guest dirtying memory (64 MiB random + a 16 MiB hot set rewritten),"
            if guest == "linux" else f"{memory} MiB guest ({memory - 32} MiB random),")
    lines = [
        f"#### {what} {rounds} round(s), {A} <-> {B} ({dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC)",
        f"Machine: {describe()}; load average at the start {load_before}, at the end {res['load_end']}",
        "",
        "| mode (medians) | wall of migrate3 | libvirt elapsed | Prepare (dest QEMU start) | Perform (copy) "
        "| Confirm (source QEMU stop) | downtime | wall / plain | copy / plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def label(name: str) -> str:
        return (f"escort's path (TLS, {default} channel(s); checks, audit, verify)"
                if name == "escort" else name)

    for name in [*res["modes"], "escort"]:
        r = rows[name]
        lines.append(
            f"| {label(name)} | {med(r, 'wall'):.2f} s | {med(r, 'libvirt'):.2f} s | "
            f"{med(r, 'prepare'):.2f} s | "
            f"{med(r, 'perform'):.2f} s | {med(r, 'confirm'):.2f} s | {med(r, 'downtime_ms'):.0f} ms | "
            f"{med(r, 'wall') / med(plain, 'wall'):.2f}x | "
            f"{med(r, 'perform') / med(plain, 'perform'):.2f}x |")
    lines += [
        "",
        "CPU used by the two QEMUs during migrate3 (medians, CPU seconds; source: migration thread + "
        "multifd senders; destination: main thread — start-up, and the whole stream on one stream — + "
        "multifd receivers) and how busy the whole machine was:",
        "",
        "| mode | source QEMU | of it: migration thread / senders | destination QEMU "
        "| of it: main / receivers | machine busy |",
        "|---|---|---|---|---|---|",
    ]
    def cpu(r: list[dict[str, float]], key: str) -> str:
        value = med(r, key)
        return "-" if value != value else f"{value:.2f}"  # NaN: no such thread (one stream)

    for name in [*res["modes"], "escort"]:
        r = rows[name]
        lines.append(
            f"| {label(name)} | {cpu(r, 'cpu_src')} s | {cpu(r, 'cpu_src_migration')} / "
            f"{cpu(r, 'cpu_src_senders')} | {cpu(r, 'cpu_dst')} s | {cpu(r, 'cpu_dst_main')} / "
            f"{cpu(r, 'cpu_dst_receivers')} | {med(r, 'machine_busy'):.0%} |")
    tls_default = rows.get(_tls_name(default), [])
    same = rows.get(_plain_same(default), plain)

    def ratio(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> str:
        return f"{med(a, key) / med(b, key):.2f}x"

    def per_round(a: list[dict[str, float]], b: list[dict[str, float]]) -> str:
        """Each round's own ratio (the two moves of one round ran within a minute)."""
        return ", ".join(f"{x['wall'] / y['wall']:.2f}" for x, y in zip(a, b, strict=False))

    pf = res["preflight"]
    esc = rows["escort"]
    lines += [
        "",
        f"Goal figures (TLS <= 1.2x plaintext, same hosts, same run): TLS with escort's default "
        f"({_tls_name(default)}) vs plaintext one stream: wall {ratio(tls_default, plain, 'wall')}, copy "
        f"{ratio(tls_default, plain, 'perform')}; vs plaintext with the same channels: wall "
        f"{ratio(tls_default, same, 'wall')}, copy {ratio(tls_default, same, 'perform')}; escort's whole "
        f"path vs plaintext one stream: wall {ratio(esc, plain, 'wall')}. Per round (wall, TLS default / "
        f"plaintext one stream): {per_round(tls_default, plain)}. CPU of both QEMUs, TLS default "
        f"vs plaintext one stream: {med(tls_default, 'cpu_src') + med(tls_default, 'cpu_dst'):.2f} s vs "
        f"{med(plain, 'cpu_src') + med(plain, 'cpu_dst'):.2f} s.",
        "",
        f"Pre-flight (refresh both hosts, decision, read the certificate the target presents): cold "
        f"{res['preflight_cold'] * 1000:.0f} ms, then median {statistics.median(pf) * 1000:.0f} ms "
        f"(all: {', '.join(f'{x * 1000:.0f}' for x in pf)} ms). escort's own time around migrate3 "
        f"(start(): proof, just-in-time re-reads, signed audit entry; then verification and the "
        f"outcome entry) median {med(esc, 'own') * 1000:.0f} ms; end to end (pre-flight + all that + "
        f"migrate3) median {med(esc, 'end_to_end'):.2f} s.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guest", choices=("random", "linux"), default="random",
                    help="random: BIOS guest with random RAM; linux: a tiny Linux that dirties memory")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds (each moves the guest once per mode; 5 ~ 3-4 min quiet)")
    ap.add_argument("--memory", type=int, default=256, help="guest RAM in MiB (>= 64)")
    ap.add_argument("--channels", default="2,4", help="multifd channel counts to measure (comma-separated)")
    ap.add_argument("--name", default="bench", help="lab name (distinct from other labs on the machine)")
    ap.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = ap.parse_args()
    if args.memory < 64:
        raise SystemExit("--memory must be at least 64")
    with tempfile.TemporaryDirectory(prefix="escort-bench-") as tmp:
        load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
        channels = [int(c) for c in args.channels.split(",") if c.strip()]
        if any(c < 2 or c > mig.MAX_CHANNELS for c in channels):
            raise SystemExit(f"--channels: each count must be 2..{mig.MAX_CHANNELS}")
        lab = Lab(Path(tmp) / "lab", args.name)
        up = lab.up()
        print(f"lab up in {up.seconds:.1f} s", flush=True)
        try:
            res = asyncio.run(_run(lab, args.memory, args.rounds, args.guest, channels))
        finally:
            lab.down()
            CLIENT_LOG.unlink(missing_ok=True)
    text = _summary(args.memory, args.rounds, res, args.guest, load_before)
    print(text)
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
