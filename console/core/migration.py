"""Migration, the pure parts: pre-flight checklist, plan, progress, stall watchdog, reconcile.

Nothing here talks to a host. The service (services/migration.py) gathers facts —
the decision, the certificate read from the target right now, host facts — and
these functions turn them into a checklist, a plan that can only ever ask for TLS,
a progress model fed with libvirt ``jobStats`` samples, and reconcile advice.

Flags and parameter names are libvirt's own values, spelled out here because the
core may not import libvirt; tests/unit/test_migration_core.py checks them against
the libvirt module so they cannot drift.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from .inventory import DomainFacts
from .reasons import Reason

# -- libvirt constants (checked against libvirt in the unit tests) ----------------------
MIGRATE_LIVE = 1
MIGRATE_PEER2PEER = 2
MIGRATE_PERSIST_DEST = 8
MIGRATE_UNDEFINE_SOURCE = 16
MIGRATE_TLS = 65536
MIGRATE_PARALLEL = 131072  # multifd: the memory stream over several TLS connections
PARAM_URI = "migrate_uri"
PARAM_TLS_DESTINATION = "tls.destination"
PARAM_BANDWIDTH = "bandwidth"  # MiB/s
PARAM_PARALLEL_CONNECTIONS = "parallel.connections"
#: multifd channels escort asks for when it chooses multifd by itself (guests larger than
#: SINGLE_STREAM_MAX_MIB). See docs/MIGRATION.md "TLS: one stream or several" for the
#: measurements, the GnuTLS re-keying report and QEMU 7.2's multifd crash on a failed move.
DEFAULT_CHANNELS = 2
#: guests up to this much memory move on one TLS stream by default: no re-keying risk
#: (the report is ~64 GB on one connection: 8 full copies of such a guest) and none of
#: QEMU 7.2's source crashes seen in the lab when a multifd TLS migration fails mid-way
SINGLE_STREAM_MAX_MIB = 8192


def default_channels(memory_mib: int) -> int:
    """The channels escort uses when nobody asked for a number: one stream for a guest of
    known size up to SINGLE_STREAM_MAX_MIB, multifd (DEFAULT_CHANNELS) for larger guests
    and for guests whose size is not known (the re-keying failure is then the bigger risk)."""
    return 1 if 0 < memory_mib <= SINGLE_STREAM_MAX_MIB else DEFAULT_CHANNELS
MAX_CHANNELS = 255  # QEMU's multifd-channels is 1..255
JOB_NONE, JOB_BOUNDED, JOB_UNBOUNDED, JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED = range(6)

#: escort's one flag set: live, encrypted, persistent on the target, gone from the source.
MIGRATION_FLAGS = MIGRATE_LIVE | MIGRATE_TLS | MIGRATE_PERSIST_DEST | MIGRATE_UNDEFINE_SOURCE
MIGRATION_PORT = 49152  # first port of the range QEMU listens on (qemu.conf migration_port_min)

# -- pre-flight -----------------------------------------------------------------------
CheckKey = Literal["policy", "allowed", "grant", "certificate", "reachable", "running", "capacity"]
CheckStatus = Literal["ok", "fail", "skipped"]

#: The checklist, in the order it is shown. Titles are what the admin reads.
CHECKS: tuple[tuple[CheckKey, str], ...] = (
    ("policy", "VM's placement policy is authentic and current"),
    ("allowed", "target is in the VM's allowed set"),
    ("grant", "admin's grant covers this VM now"),
    ("certificate", "target presents the checked certificate, valid long enough"),
    ("reachable", "source and target reachable"),
    ("running", "VM is running on the source"),
    ("capacity", "target has room (memory, vCPUs)"),
)
_TITLES = dict(CHECKS)


@dataclass(frozen=True)
class CheckItem:
    key: CheckKey
    status: CheckStatus
    reasons: tuple[Reason, ...] = ()
    detail: str = ""  # what was found when it passed (e.g. the fingerprint)

    @property
    def title(self) -> str:
        return _TITLES[self.key]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"check": self.key, "title": self.title, "status": self.status,
                               "reasons": [r.as_json() for r in self.reasons]}
        if self.detail:
            out["detail"] = self.detail
        return out


def passed(key: CheckKey, detail: str = "") -> CheckItem:
    return CheckItem(key, "ok", (), detail)


def failed(key: CheckKey, *reasons: Reason) -> CheckItem:
    return CheckItem(key, "fail", tuple(reasons))


def skipped(key: CheckKey, why: str) -> CheckItem:
    return CheckItem(key, "skipped", (Reason(f"preflight.{key}.skipped", why, severity="warning"),))


def item_from_reasons(key: CheckKey, reasons: Iterable[Reason], detail: str = "") -> CheckItem:
    """``ok`` when no error-severity reason; warnings ride along either way."""
    rs = tuple(reasons)
    errors = [r for r in rs if r.severity == "error"]
    return CheckItem(key, "fail" if errors else "ok", rs, detail)


def split_decision_reasons(reasons: Iterable[Reason]) -> dict[CheckKey, list[Reason]]:
    """Sort a decision's reasons into checklist items by their stable code prefix.

    ``policy.*`` -> the policy item, ``grant.*``/``admin.*`` -> the grant item, anything
    else (``cert.*``, ``ca.*``, ``attr.*``, ``host.*``...) says why the target is not in
    the allowed set.
    """
    out: dict[CheckKey, list[Reason]] = {"policy": [], "allowed": [], "grant": []}
    for r in reasons:
        head = r.code.split(".", 1)[0]
        if head == "policy":
            out["policy"].append(r)
        elif head in ("grant", "admin"):
            out["grant"].append(r)
        else:
            out["allowed"].append(r)
    return out


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 over the DER, lowercase hex: the same value pki.CertInfo.fingerprint holds."""
    return cert.fingerprint(hashes.SHA256()).hex()


def san_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of the certificate's subjectAltName."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (list(san.get_values_for_type(x509.DNSName)),
            [str(ip) for ip in san.get_values_for_type(x509.IPAddress)])


def tls_name_for(cert: x509.Certificate, wanted: str = "") -> tuple[str, Reason | None]:
    """The name to pass as ``VIR_MIGRATE_PARAM_TLS_DESTINATION``: one the checked cert carries.

    QEMU compares this name with the certificate the destination presents, so taking
    it from the checked certificate is what pins the TLS session to that certificate's
    SAN. A fleet file may name it (``tls_name``); it must then be in the SAN.
    """
    dns, ips = san_names(cert)
    if wanted:
        if wanted in dns or wanted in ips:
            return wanted, None
        return "", Reason("migration.tls_name",
                          f"the fleet file's tls_name {wanted!r} is not in the target certificate's "
                          f"names ({', '.join(dns + ips) or 'none'})",
                          "set tls_name to a DNS name from the host certificate's subjectAltName")
    if dns:
        return dns[0], None
    if ips:
        return ips[0], None
    return "", Reason("migration.tls_name", "the target certificate has no subjectAltName to pin TLS to",
                      "issue the host certificate with its hostname in subjectAltName")


def expected_duration_s(memory_mib: int, bandwidth_mib_s: float = 0.0) -> float:
    """A deliberately pessimistic estimate (3x raw copy time, at least a minute).

    Used to require that the target certificate outlives the migration; an estimate
    that is too long only asks for a slightly fresher certificate.
    """
    rate = bandwidth_mib_s if bandwidth_mib_s > 0 else 32.0  # TCG + TLS on a busy host
    return max(60.0, 3.0 * memory_mib / rate)


def check_certificate(checked: x509.Certificate | None, presented: x509.Certificate | None, *,
                      at: dt.datetime, duration_s: float, margin_s: float = 600.0,
                      presented_problem: Reason | None = None) -> CheckItem:
    """Is the certificate the target will present for migration the one the decision checked?

    ``checked`` is the certificate the allowed-set decision validated; ``presented`` is
    the one read from the target just now (what QEMU will send). Equality of SHA-256
    fingerprints, and validity until ``at + duration + margin``.
    """
    if presented is None:
        return failed("certificate", presented_problem or Reason(
            "migration.cert_unreadable", "the target's migration certificate could not be read",
            "check that the host is reachable and its certificate path in the fleet file"))
    if checked is None:
        return failed("certificate", Reason(
            "migration.cert_unchecked", "no checked certificate for the target to compare with",
            "refresh the inventory so the target's certificate is checked first"))
    reasons: list[Reason] = []
    fp_checked, fp_presented = fingerprint(checked), fingerprint(presented)
    if fp_checked != fp_presented:
        reasons.append(Reason(
            "migration.cert_changed",
            f"the target now presents certificate {fp_presented[:16]}…, not the checked "
            f"{fp_checked[:16]}…",
            "refresh the inventory to check the new certificate, then try again"))
    need_until = at + dt.timedelta(seconds=duration_s + margin_s)
    not_after = presented.not_valid_after_utc
    if presented.not_valid_before_utc > at:
        reasons.append(Reason("migration.cert_not_yet_valid",
                              "the target certificate is valid only from "
                              f"{presented.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                              "wait, or fix the host's clock or certificate"))
    elif not_after < need_until:
        left = (not_after - at).total_seconds()
        what = "has expired" if left <= 0 else f"expires in {int(left // 60)} min"
        reasons.append(Reason("migration.cert_expiring",
                              f"the target certificate {what}, before the migration "
                              f"(~{int(duration_s // 60) + 1} min) plus a "
                              f"{int(margin_s // 60)} min margin would end",
                              "renew the target host's certificate"))
    if reasons:
        return failed("certificate", *reasons)
    return passed("certificate", f"sha256 {fp_presented}, valid until {not_after:%Y-%m-%d %H:%M} UTC")


def check_reachable(source: str, source_up: bool, source_problem: Reason | None,
                    target: str, target_up: bool, target_problem: Reason | None) -> CheckItem:
    reasons: list[Reason] = []
    for name, up, problem in ((source, source_up, source_problem), (target, target_up, target_problem)):
        if not up:
            base = problem.message if problem else "not reachable"
            reasons.append(Reason("migration.unreachable", f"{name}: {base}",
                                  problem.fix if problem and problem.fix else
                                  "check SSH and libvirt on the host, then refresh"))
    return failed("reachable", *reasons) if reasons else passed("reachable")


def check_running(vm: str, source: str, facts: DomainFacts | None) -> CheckItem:
    if facts is None:
        return failed("running", Reason("migration.vm_missing", f"{vm} is not on {source}",
                                        "refresh the inventory; the VM may have moved"))
    if facts.state != "running":
        why = f" ({facts.state_reason})" if facts.state_reason else ""
        return failed("running", Reason("migration.vm_not_running",
                                        f"{vm} is {facts.state}{why} on {source}; live migration "
                                        "needs a running VM",
                                        "start or resume the VM, or run reconcile if it is paused "
                                        "for migration"))
    return passed("running")


def check_capacity(target: str, *, free_memory_mib: int, cpus: int, memory_mib: int, vcpus: int,
                   reserved_memory_mib: int = 0) -> CheckItem:
    """Room on the target, as libvirt reports it (minus what other planned moves take)."""
    reasons: list[Reason] = []
    free = free_memory_mib - reserved_memory_mib
    if memory_mib > free:
        reasons.append(Reason("migration.no_memory",
                              f"{target} has {max(free, 0)} MiB free, the VM needs {memory_mib} MiB",
                              "free memory on the target or pick another host"))
    if vcpus > cpus:
        reasons.append(Reason("migration.no_cpus",
                              f"{target} has {cpus} CPUs, the VM has {vcpus} vCPUs",
                              "pick a larger host"))
    if reasons:
        return failed("capacity", *reasons)
    return passed("capacity", f"{free} MiB free, {cpus} CPUs; VM needs {memory_mib} MiB, {vcpus} vCPUs")


@dataclass(frozen=True)
class MigrationPlan:
    """What will be asked of libvirt. There is no way to build one without TLS."""

    vm_uuid: str
    vm_name: str
    source: str
    target: str
    tls_name: str  # from the checked certificate's SAN
    migration_uri: str  # tcp://<target migration address>[:port]
    cert_fingerprint: str  # the checked (and just re-read) target certificate
    admin: str = ""
    policy_hash: str = ""
    grant_id: str = ""
    bandwidth_mib_s: int = 0  # 0 = unlimited
    flags: int = MIGRATION_FLAGS
    channels: int = 0  # multifd TLS connections (VIR_MIGRATE_PARALLEL); 0 or 1 = one stream

    def __post_init__(self) -> None:
        if not self.flags & MIGRATE_TLS:
            raise ValueError("escort never migrates without TLS")
        if not 0 <= self.channels <= MAX_CHANNELS:
            raise ValueError(f"channels must be 0..{MAX_CHANNELS}")
        if self.channels > 1:
            object.__setattr__(self, "flags", self.flags | MIGRATE_PARALLEL)
        if not self.tls_name:
            raise ValueError("a migration plan needs the TLS name from the checked certificate")
        if not self.migration_uri.startswith("tcp://"):
            raise ValueError("the migration URI must be explicit (tcp://address)")

    def params(self) -> dict[str, Any]:
        """``virDomainMigrate3`` typed parameters (libvirt's names)."""
        out: dict[str, Any] = {PARAM_URI: self.migration_uri, PARAM_TLS_DESTINATION: self.tls_name}
        if self.bandwidth_mib_s:
            out[PARAM_BANDWIDTH] = int(self.bandwidth_mib_s)
        if self.flags & MIGRATE_PARALLEL:
            out[PARAM_PARALLEL_CONNECTIONS] = int(max(self.channels, 2))
        return out

    def flag_names(self) -> list[str]:
        names = {MIGRATE_LIVE: "LIVE", MIGRATE_PEER2PEER: "PEER2PEER", MIGRATE_TLS: "TLS",
                 MIGRATE_PERSIST_DEST: "PERSIST_DEST", MIGRATE_UNDEFINE_SOURCE: "UNDEFINE_SOURCE",
                 MIGRATE_PARALLEL: "PARALLEL"}
        return [n for bit, n in sorted(names.items()) if self.flags & bit]

    def as_json(self) -> dict[str, Any]:
        return {"vm": self.vm_name, "uuid": self.vm_uuid, "source": self.source, "target": self.target,
                "tls_name": self.tls_name, "uri": self.migration_uri, "flags": self.flag_names(),
                "target_cert_sha256": self.cert_fingerprint, "admin": self.admin,
                "policy_hash": self.policy_hash, "grant_id": self.grant_id,
                "bandwidth_mib_s": self.bandwidth_mib_s, "channels": max(self.channels, 1)}


def migration_uri(address: str, port: int = 0) -> str:
    """``tcp://address`` (IPv6 bracketed). Explicit, because the destination announces a
    hostname that nothing resolves."""
    host = address
    try:
        if ipaddress.ip_address(address).version == 6:
            host = f"[{address}]"
    except ValueError:
        pass
    return f"tcp://{host}:{port}" if port else f"tcp://{host}"


@dataclass(frozen=True)
class Preflight:
    vm: str
    vm_uuid: str
    source: str
    target: str
    admin: str
    at: dt.datetime
    items: tuple[CheckItem, ...]
    plan: MigrationPlan | None = None
    elapsed_s: float = 0.0  # how long the checks took (the time the console adds)
    policy_hash: str = ""  # sha256 of the VM's policy token ("" when none)
    grant_id: str = ""  # jti of the grant the decision relied on ("" when none)
    cert_fingerprint: str = ""  # the certificate the target presents now ("" when unread)

    @property
    def ok(self) -> bool:
        """Every check ran and passed (zero checks never pass) and there is a plan."""
        ran = {i.key for i in self.items}
        return (ran == {k for k, _ in CHECKS} and all(i.ok for i in self.items)
                and self.plan is not None)

    @property
    def reasons(self) -> list[Reason]:
        return [r for i in self.items for r in i.reasons if r.severity == "error"]

    def item(self, key: CheckKey) -> CheckItem | None:
        return next((i for i in self.items if i.key == key), None)

    def as_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "uuid": self.vm_uuid, "source": self.source, "target": self.target,
                "admin": self.admin, "at": self.at.isoformat(), "ok": self.ok,
                "checks": [i.as_json() for i in self.items],
                "plan": self.plan.as_json() if self.plan else None,
                "elapsed_s": round(self.elapsed_s, 4), "policy_hash": self.policy_hash,
                "grant_id": self.grant_id, "target_cert_sha256": self.cert_fingerprint}


def assemble(vm: str, vm_uuid: str, source: str, target: str, admin: str, at: dt.datetime,
             items: Mapping[CheckKey, CheckItem], plan: MigrationPlan | None,
             elapsed_s: float = 0.0, *, policy_hash: str = "", grant_id: str = "",
             cert_fingerprint: str = "") -> Preflight:
    """Every check in the fixed order; a check the caller did not run is ``skipped`` (not ok)."""
    ordered = tuple(items.get(key) or skipped(key, "not checked") for key, _ in CHECKS)
    ok = all(i.ok for i in ordered)
    return Preflight(vm, vm_uuid, source, target, admin, at, ordered, plan if ok else None, elapsed_s,
                     policy_hash, grant_id, cert_fingerprint)


# -- progress -------------------------------------------------------------------------
Phase = Literal["preflight", "starting", "copying", "converging", "switchover", "verifying",
                "completed", "failed", "aborted"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "aborted"})


@dataclass(frozen=True)
class Progress:
    """One refresh of a migration's panel. Sizes in bytes, rates in bytes/s, times in s."""

    phase: Phase
    elapsed_s: float = 0.0
    data_total: int | None = None  # None until libvirt knows it (virt-manager's rule)
    data_processed: int = 0
    data_remaining: int | None = None
    rate_bps: float = 0.0
    rate_history: tuple[float, ...] = ()  # for a sparkline, oldest first
    dirty_rate_bps: float = 0.0
    iteration: int = 0
    eta_s: float | None = None
    downtime_ms: int | None = None
    message: str = ""  # the error, or what is happening now

    @property
    def fraction(self) -> float | None:
        """Share of the current pass that is done; None while unknown."""
        if not self.data_total or self.data_remaining is None:
            return None
        return max(0.0, min(1.0, 1.0 - self.data_remaining / self.data_total))

    def as_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "elapsed_s": round(self.elapsed_s, 3), "data_total": self.data_total,
                "data_processed": self.data_processed, "data_remaining": self.data_remaining,
                "rate_bps": round(self.rate_bps), "dirty_rate_bps": round(self.dirty_rate_bps),
                "iteration": self.iteration,
                "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
                "downtime_ms": self.downtime_ms, "message": self.message}


def _int(stats: Mapping[str, Any], key: str) -> int:
    value = stats.get(key, 0)
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


class ProgressTracker:
    """Turns ``jobStats()`` samples into ``Progress``; keeps the rate history.

    Samples taken while ``data_total`` is 0 (the destination is still starting) are
    ignored for the numbers, as virt-manager does: they carry no meaningful totals.
    The rate is libvirt's ``memory_bps`` when given, else derived from two samples.
    """

    def __init__(self, *, history: int = 60) -> None:
        self._history: deque[float] = deque(maxlen=history)
        self._last_processed: int | None = None
        self._last_at: float | None = None
        self._started_at: float | None = None
        self.current = Progress("starting")

    def start(self, at: float) -> Progress:
        self._started_at = at
        self.current = Progress("starting", message="destination preparing")
        return self.current

    def feed(self, stats: Mapping[str, Any], at: float, *, source_paused: bool = False) -> Progress:
        """One sample (monotonic time ``at``); returns the new state (unchanged if ignored)."""
        if self._started_at is None:
            self._started_at = at
        elapsed = at - self._started_at
        if self.current.phase in TERMINAL:
            return self.current
        total = _int(stats, "data_total")
        if _int(stats, "type") == JOB_NONE or total == 0:
            self.current = replace(self.current, elapsed_s=elapsed)
            return self.current
        processed = _int(stats, "data_processed")
        remaining = _int(stats, "data_remaining")
        rate = float(_int(stats, "memory_bps"))
        last_p, last_at = self._last_processed, self._last_at
        if rate <= 0 and last_p is not None and last_at is not None and at > last_at:
            rate = max(0.0, (processed - last_p) / (at - last_at))
        self._last_processed, self._last_at = processed, at
        self._history.append(rate)
        page = _int(stats, "memory_page_size") or 4096
        dirty = float(_int(stats, "memory_dirty_rate")) * page
        iteration = _int(stats, "memory_iteration")
        if source_paused:
            phase: Phase = "switchover"
        elif iteration <= 1:
            phase = "copying"
        else:
            phase = "converging"
        eta = remaining / rate if rate > 0 else None
        if eta is not None and dirty >= rate > 0:
            eta = None  # dirtying as fast as we send: no honest ETA
        job_elapsed = _int(stats, "time_elapsed")
        self.current = Progress(phase, job_elapsed / 1000.0 if job_elapsed else elapsed, total, processed,
                                remaining, rate, tuple(self._history), dirty, iteration, eta)
        return self.current

    def set_phase(self, phase: Phase, message: str = "", *, at: float | None = None) -> Progress:
        elapsed = self.current.elapsed_s
        if at is not None and self._started_at is not None:
            elapsed = at - self._started_at
        moving = phase in ("copying", "converging", "switchover")
        self.current = replace(self.current, phase=phase, message=message, elapsed_s=elapsed,
                               eta_s=self.current.eta_s if moving else None)
        return self.current

    def complete(self, completed_stats: Mapping[str, Any], at: float | None = None) -> Progress:
        """Final numbers from ``jobStats(COMPLETED)`` (downtime, total time)."""
        downtime = completed_stats.get("downtime")
        elapsed_ms = _int(completed_stats, "time_elapsed")
        processed = _int(completed_stats, "data_processed") or self.current.data_processed
        total = _int(completed_stats, "data_total") or self.current.data_total
        iteration = _int(completed_stats, "memory_iteration") or self.current.iteration
        self.current = replace(
            self.current, phase="completed", message="",
            downtime_ms=int(downtime) if isinstance(downtime, int | float) else None,
            elapsed_s=elapsed_ms / 1000.0 if elapsed_ms else self.current.elapsed_s,
            data_processed=processed, data_total=total, data_remaining=0, eta_s=None,
            iteration=iteration)
        return self.current


# -- stall watchdog -------------------------------------------------------------------
class StallWatchdog:
    """Fires when the amount of data sent stops growing for ``timeout_s``.

    A cut migration link raises no error at all: QEMU keeps waiting on TCP for
    minutes. Before the first byte is counted (destination QEMU still starting) a
    longer ``start_timeout_s`` applies, so a slow first start is not mistaken for a
    stall. ``clock`` is injectable for tests (monotonic seconds).
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float], *,
                 start_timeout_s: float | None = None) -> None:
        if timeout_s <= 0:
            raise ValueError("stall timeout must be positive")
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s if start_timeout_s is not None else max(60.0, 3 * timeout_s)
        self._clock = clock
        self._last_change = clock()
        self._best = -1
        self._started = False
        self.fired = False

    def observe(self, processed: int | None) -> bool:
        """Record a sample (``None``/0 while nothing is known); True when stalled."""
        now = self._clock()
        if processed and processed > self._best:
            self._best = processed
            self._last_change = now
            self._started = True
        limit = self.timeout_s if self._started else self.start_timeout_s
        if now - self._last_change >= limit:
            self.fired = True
        return self.fired

    def stalled_for(self) -> float:
        return self._clock() - self._last_change


# -- reconcile ------------------------------------------------------------------------
Step = tuple[Literal["destroy", "resume", "undefine"], str]  # (action, host)


@dataclass(frozen=True)
class Copy:
    host: str
    state: str
    reason: str = ""
    persistent: bool = True

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def paused_for_migration(self) -> bool:
        return self.state == "paused" and self.reason in ("migration", "incoming migration")

    def describe(self) -> str:
        why = f" ({self.reason})" if self.reason else ""
        kind = "" if self.persistent else ", transient"
        return f"{self.state}{why} on {self.host}{kind}"


@dataclass(frozen=True)
class ReconcileCase:
    """A VM left in a state only a migration leaves behind, and the one safe way out."""

    uuid: str
    name: str
    copies: tuple[Copy, ...]
    code: str
    message: str
    steps: tuple[Step, ...] = ()  # empty: no safe automatic resolution, a person decides
    advice: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name, "code": self.code, "message": self.message,
                "copies": [c.describe() for c in self.copies],
                "steps": [list(s) for s in self.steps], "advice": self.advice}


def find_reconcile_cases(hosts: Mapping[str, Sequence[DomainFacts]],
                         last_target: Mapping[str, str] | None = None) -> list[ReconcileCase]:
    """Look at every host's domains and find VMs a migration left half-done.

    ``last_target`` (uuid -> host) is what the audit log says the last successful
    migration of each VM was; it is only used to word advice, never to act.
    Never proposes resuming one copy while another runs.
    """
    by_uuid: dict[str, list[tuple[str, DomainFacts]]] = {}
    for host, domains in hosts.items():
        for d in domains:
            by_uuid.setdefault(d.uuid, []).append((host, d))
    cases: list[ReconcileCase] = []
    for uuid, found in sorted(by_uuid.items()):
        name = found[0][1].name
        copies = tuple(Copy(h, d.state, d.state_reason, d.persistent) for h, d in found)
        case = _classify(uuid, name, copies, (last_target or {}).get(uuid, ""))
        if case is not None:
            cases.append(case)
    return cases


def _classify(uuid: str, name: str, copies: tuple[Copy, ...], last_target: str) -> ReconcileCase | None:
    running = [c for c in copies if c.running]
    paused_mig = [c for c in copies if c.paused_for_migration]
    others = [c for c in copies if not c.running and not c.paused_for_migration]
    if len(running) > 1:
        hint = f" The audit log's last completed migration went to {last_target}." if last_target else ""
        return ReconcileCase(uuid, name, copies, "reconcile.split_brain",
                             f"{name} runs on {len(running)} hosts at once",
                             (), "No automatic resolution: both copies may have written data. "
                             "Pause one after checking which one clients use, then destroy it." + hint)
    leftovers = [c for c in copies if not c.running and not c.persistent
                 and (c.reason == "incoming migration" or c.state == "paused")]
    if len(running) == 1 and leftovers and all(c in leftovers for c in copies if not c.running):
        # The migration failed before Finish: the target's unfinished incoming QEMU
        # (transient, started paused) is still there. It cannot run by itself; remove it.
        return ReconcileCase(uuid, name, copies, "reconcile.leftover_incoming",
                             f"{name} runs on {running[0].host}; an unfinished incoming copy is left "
                             f"on {', '.join(c.host for c in leftovers)}",
                             tuple(("destroy", c.host) for c in leftovers),
                             f"Keep the running copy on {running[0].host}; destroy the leftover "
                             "incoming copy (it never ran).")
    if len(running) == 1 and paused_mig:
        # Switch-over happened (the destination runs); the paused copies are stale.
        steps: list[Step] = [("destroy", c.host) for c in paused_mig]
        steps += [("undefine", c.host) for c in paused_mig if c.persistent]
        return ReconcileCase(uuid, name, copies, "reconcile.stale_source",
                             f"{name} runs on {running[0].host} and is also paused for migration on "
                             f"{', '.join(c.host for c in paused_mig)}",
                             tuple(steps),
                             f"Keep the running copy on {running[0].host}; remove the paused one.")
    if not running and paused_mig:
        # No copy runs. The source still holds the complete state unless the
        # destination reached Finish (then it would run). The paused copy that is
        # persistent on its host is the source: measured on libvirt 9.0, the incoming
        # copy on the destination is paused with reason "migration" too, but transient.
        sources = [c for c in paused_mig if c.reason != "incoming migration" and c.persistent]
        incoming = [c for c in paused_mig if c not in sources]
        if len(sources) == 1:
            steps = [("destroy", c.host) for c in incoming]
            steps.append(("resume", sources[0].host))
            return ReconcileCase(uuid, name, copies, "reconcile.paused_source",
                                 f"{name} is paused for migration on {sources[0].host} and runs nowhere",
                                 tuple(steps),
                                 f"Resume it on {sources[0].host}"
                                 + (" after destroying the unfinished incoming copy" if incoming else "")
                                 + ".")
        return ReconcileCase(uuid, name, copies, "reconcile.ambiguous",
                             f"{name} is paused for migration on {len(paused_mig)} hosts and runs nowhere",
                             (), "No automatic resolution: decide which host holds the current state.")
    if len(running) == 1 and [c for c in others if c.persistent]:
        stale = [c for c in others if c.persistent]
        return ReconcileCase(uuid, name, copies, "reconcile.stale_definition",
                             f"{name} runs on {running[0].host} but is still defined on "
                             f"{', '.join(c.host for c in stale)}",
                             tuple(("undefine", c.host) for c in stale),
                             "Undefine the inactive copy so it can never be started twice.")
    return None


# -- after the migration: what was seen, and what can be said ------------------------------
VmState = Literal["moved", "stayed", "unknown"]
Role = Literal["source", "target"]


@dataclass(frozen=True)
class HostSeen:
    """One host's answer (or silence) when asked where the VM is after a migration.

    ``answered`` False means the host could not be asked: ``problem`` says why. Then
    nothing is known about the VM there — never "not running".
    """

    host: str
    role: Role
    answered: bool
    copy: DomainFacts | None = None  # None when answered: the VM is not defined there
    problem: str = ""  # why the host could not be asked
    gone: bool = False  # the failure is definite (refused, daemon down), not "no answer yet"

    @property
    def running(self) -> bool:
        return self.answered and self.copy is not None and self.copy.state == "running"

    @property
    def state(self) -> str:
        """"running", "paused (migration)", "absent", ... or "unknown" when not asked."""
        if not self.answered:
            return "unknown"
        if self.copy is None:
            return "absent"
        reason = self.copy.state_reason if self.copy.state != "running" else ""
        why = f" ({reason})" if reason else ""
        return f"{self.copy.state}{why}"

    def describe(self) -> str:
        if not self.answered:
            return f"{self.host} ({self.role}) could not be asked: {self.problem or 'no answer'}"
        if self.copy is None:
            return f"{self.host} ({self.role}): not there (checked)"
        kind = "" if self.copy.persistent else ", transient"
        return f"{self.host} ({self.role}): {self.state}{kind} (checked)"

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"host": self.host, "role": self.role, "checked": self.answered,
                               "state": self.state}
        if self.answered and self.copy is not None:
            out["persistent"] = self.copy.persistent
        if not self.answered:
            out["problem"] = self.problem
        return out


@dataclass(frozen=True)
class Verdict:
    """Where the VM is, as far as it was verified: moved, stayed, or unknown (+ next step)."""

    vm_state: VmState
    vm_on: str  # the host it was verified running on ("" unless moved/stayed)
    hosts: tuple[HostSeen, ...]
    summary: str  # one sentence: the state and what it rests on
    next_step: str = ""  # what the operator does now ("" when nothing is needed)
    needs_reconcile: bool = False

    def host_lines(self) -> list[str]:
        return [h.describe() for h in self.hosts]


def judge(vm: str, source: HostSeen, target: HostSeen, *, libvirt_ok: bool,
          copy_started: bool = True) -> Verdict:
    """Turn the two hosts' answers into a three-valued state. Pure; never guesses.

    * moved: verified running on the target, and the source did not answer "running".
      A source that could not be asked may still hold a *paused* copy (libvirt never
      resumes a source after switch-over): that is said, and reconcile finds it later.
    * stayed: verified running on the source, and the target holds no running copy
      (when the target could not be asked: only if libvirt did not resume the source
      after a switch-over — reason "migration canceled" — because then the target may
      have resumed it too, its answer lost).
      A target that could not be asked may hold an unfinished incoming QEMU: it was
      started paused and only the target's libvirtd could resume it, so it cannot run
      by itself; the next step says to check the target when it is back.
    * unknown: anything else (a host could not be asked and the other does not run
      the VM, both run it, it runs nowhere); ``next_step`` names the host to check.
    """
    hosts = (source, target)
    reconcile_hint = ("`escort reconcile` (or the console's Migrations tab, key s) finds and fixes "
                      "any copy left behind")
    if source.running and target.running:
        return Verdict("unknown", "", hosts,
                       f"{vm} is running on BOTH {source.host} and {target.host} (checked)",
                       "do not start anything: check which copy clients use, pause the other; "
                       "`escort reconcile` lists it", True)
    if target.running:
        extra = ""
        leftover = source.answered and source.copy is not None
        if not source.answered:
            extra = (f"; {source.host} could not be asked ({source.problem}): it may still hold a "
                     "paused copy, which libvirt never resumes by itself")
        step = ""
        if not source.answered:
            step = f"when {source.host} answers again, check it: {reconcile_hint}"
        elif leftover:
            step = f"{source.host} still has a {source.state} copy: {reconcile_hint}"
        gone = ""
        if source.answered:
            gone = (f" and is gone from {source.host} (checked)" if source.copy is None else
                    f"; {source.host} still has a {source.state} copy (checked)")
        return Verdict("moved", target.host, hosts,
                       f"{vm} moved: it runs on {target.host} (checked){gone}{extra}",
                       step, leftover or not source.answered)
    resumed_after_switchover = (source.copy is not None and source.copy.state_reason == "migration canceled")
    if source.running and not libvirt_ok and (target.answered or not resumed_after_switchover):
        leftover = target.answered and target.copy is not None
        extra = ""
        step = ""
        if not target.answered:
            extra = (f"; {target.host} could not be asked ({target.problem})"
                     + (": an unfinished incoming copy may be left there (paused; it cannot run by "
                        "itself, libvirt removes it when its daemon is back)" if copy_started else ""))
            step = f"when {target.host} answers again, check it: {reconcile_hint}"
        elif leftover:
            step = f"{target.host} still has a {target.state} copy: {reconcile_hint}"
        there = ""
        if target.answered:
            there = (f", not on {target.host} (checked)" if target.copy is None else
                     f"; {target.host} still has a {target.state} copy (checked)")
        return Verdict("stayed", source.host, hosts,
                       f"{vm} stayed: it is still running on {source.host} (checked){there}{extra}",
                       step, leftover or not target.answered)
    # unknown: say exactly what was and was not seen, and which host to check
    silent = [h for h in hosts if not h.answered]
    seen = "; ".join(h.describe() for h in hosts)
    if silent:
        names = " and ".join(h.host for h in silent)
        step = f"check {names} (could not be asked, see above); when it answers again, {reconcile_hint}"
        return Verdict("unknown", "", hosts,
                       f"{vm}: where it runs is UNKNOWN — {seen}", step, True)
    crashed = [h for h in hosts if h.copy is not None and h.copy.state == "shut off"
               and h.copy.state_reason == "crashed" and h.copy.persistent]
    if crashed:
        # QEMU itself died (libvirt: shut off, crashed); seen in the lab with QEMU 7.2 when
        # a TLS multifd migration fails mid-way (docs/MIGRATION.md 2b). The definition
        # is intact, the guest's memory is not: starting it is a fresh boot, which escort
        # never does by itself. reconcile does not list a lone shut-off VM, so say it here.
        where = crashed[0].host
        return Verdict("unknown", "", hosts,
                       f"{vm} runs on neither host: its QEMU on {where} crashed (libvirt: shut off, "
                       f"crashed) — {seen}",
                       f"the guest's memory is lost; after checking {where}'s QEMU log "
                       f"(/var/log/libvirt/qemu/{vm}.log), start it again there (`virsh start {vm}` "
                       f"on {where}): a fresh boot, which escort never does by itself", True)
    return Verdict("unknown", "", hosts,
                   f"{vm} runs on neither host — {seen}",
                   "`escort reconcile` (or the Migrations tab, key s) says how to bring it back", True)


@dataclass
class Outcome:
    """How a migration ended, as the audit log and the console report it.

    ``result`` is what happened to the attempt ("success" only when the VM was
    verified on the target); ``vm_state`` is where the VM is as far as it was
    verified — "moved", "stayed" or "unknown" — and ``hosts`` what each host
    answered (or why it could not be asked). ``next_step`` says what to do when
    anything is left to check.
    """

    result: Literal["success", "failed", "aborted", "refused", "unknown"]
    vm_on: str  # the host the VM was verified running on ("" when it could not be verified)
    message: str = ""
    reasons: list[Reason] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    downtime_ms: int | None = None
    vm_state: str = ""  # "moved" | "stayed" | "unknown" ("" when nothing was attempted)
    hosts: list[HostSeen] = field(default_factory=list)
    next_step: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"result": self.result, "vm_on": self.vm_on, "message": self.message,
                "reasons": [r.as_json() for r in self.reasons],
                "timings": {k: round(v, 3) for k, v in self.timings.items()},
                "downtime_ms": self.downtime_ms, "vm_state": self.vm_state,
                "hosts": [h.as_json() for h in self.hosts], "next_step": self.next_step}


__all__ = [
    "CHECKS",
    "MIGRATION_FLAGS",
    "CheckItem",
    "Copy",
    "HostSeen",
    "MigrationPlan",
    "Outcome",
    "Preflight",
    "Progress",
    "ProgressTracker",
    "ReconcileCase",
    "StallWatchdog",
    "Verdict",
    "assemble",
    "check_capacity",
    "check_certificate",
    "check_reachable",
    "check_running",
    "expected_duration_s",
    "find_reconcile_cases",
    "fingerprint",
    "item_from_reasons",
    "judge",
    "migration_uri",
    "split_decision_reasons",
    "tls_name_for",
]
