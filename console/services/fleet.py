"""The one offline API the UI and the CLI share: load a fleet, check trust, decide.

``FleetService.load`` never raises for the UI: a missing fleet file, an empty trust
directory or an unreadable certificate becomes a ``Problem`` that the console shows
where it belongs (the problem bar, the host row), and everything that *could* be
loaded still works. ``load_strict`` is the CLI's variant: unusable input is an
``InputError`` (exit 2).

Costs are paid once: each host chain is checked once per time, each policy token
verified once (``PolicyBook``), the allowed-target matrix is computed once and
reused until ``apply_facts`` changes something. Read-only mode is enforced here
(``require_writable``), not by hiding buttons.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import os
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from console.adapters.files import load_trust_store, read_limited
from console.adapters.fleetfile import Only, load_fleet
from console.adapters.state import PolicyMemory, read_raw, state_path
from console.core import pki
from console.core.decisions import (
    Decision,
    Groups,
    HostCheck,
    HostIndex,
    Matrix,
    VMCheck,
    allowed_matrix,
    allowed_row,
    decide,
)
from console.core.envelope import (
    NBF_SKEW,
    TYP_GRANT,
    TYP_POLICY,
    EnvelopeVerifier,
    Opened,
    Portable,
    pack_opened,
    reason,
    token_digest,
)
from console.core.errors import ConnectionProblem, EscortError, InputError, ReadOnlyError
from console.core.grants import GRANT_FIELDS, AdminRef, GrantBook, GrantResult, authorise
from console.core.inventory import (
    AdminSpec,
    FleetKind,
    FleetSpec,
    HostFacts,
    HostSpec,
    HostView,
    VMView,
)
from console.core.pki import Problem, TrustStore
from console.core.pki.model import EXPIRING_DAYS
from console.core.policy import (
    POLICY_FIELDS,
    PolicyBook,
    PolicyResult,
    SeenPolicy,
    merge_seen,
    token_from_metadata_xml,
)
from console.core.reasons import Reason
from console.core.records import maker
from console.core.timekey import boundaries, time_key

if TYPE_CHECKING:  # imported when used: a one-pair answer needs none of it (~30-50 ms of imports)
    import multiprocessing.process
    from multiprocessing.connection import Connection

    from console.adapters.cache import FleetSnapshot, OpenedCache
    from console.adapters.parsecache import ParsedCache

#: Below this many unopened tokens, starting a worker costs more than it saves.
PARALLEL_MIN_TOKENS = 2000
#: Below this many hosts, a forked helper for ``targets`` costs more than it saves.
PARALLEL_MIN_HOSTS = 200
#: A host certificate check (chain + attributes) costs about this many token checks.
HOST_CHECK_WEIGHT = 3.0
#: VMs whose full checks a snapshot pickles together (``_capture``, ``_adopt_lazy``)
CHECK_GROUP = 64


def _open_chunk(args: tuple[list[str], str, frozenset[str]]) -> bytes:
    return pack_opened(*args)[0]


def open_tokens_parallel(verifier: EnvelopeVerifier, tokens: Iterable[str], typ: str,
                         fields: frozenset[str], *, workers: int | None = None,
                         meanwhile: Callable[[], object] | None = None,
                         meanwhile_weight: float = 0.0) -> int:
    """Open (parse + signature check) many tokens on every core, ahead of the matrix.

    Signature checks dominate a big fleet's load (10,000 ES256 policies ~ 1.5-2 s of
    CPU), and they are independent, so they are split across worker processes and
    this process. ``meanwhile`` is other work for this process to do while the workers
    run (the host chain checks); ``meanwhile_weight`` estimates that work in token
    checks (a host chain check costs about three) so that every process finishes at
    about the same time. Results land in ``verifier``'s cache; the time and owner-chain checks then
    run in-process as usual. Falls back to the lazy in-process path (after running
    ``meanwhile``) when there is one core, few tokens, or other threads are running
    (forking a threaded process is unsafe — e.g. inside the UI). Returns the number of
    tokens opened here.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    todo = list(dict.fromkeys(t.strip() for t in tokens if t and not verifier.is_open(t, typ)))
    n = workers if workers is not None else (os.cpu_count() or 1)
    if (n <= 1 or len(todo) < PARALLEL_MIN_TOKENS or threading.active_count() > 1
            or "fork" not in multiprocessing.get_all_start_methods()):
        if meanwhile is not None:
            meanwhile()
        return 0
    total = len(todo)
    # this process: W + x*T == (1 - x)*T / (n - 1)  =>  x = (T - (n - 1)*W) / (n*T)
    own = max(0, int((total - (n - 1) * meanwhile_weight) / n))
    rest = todo[own:]
    chunks = [rest[i::n - 1] for i in range(n - 1)]
    # Objects the children inherit stay untouched by their garbage collector (no
    # copy-on-write storm over the parent's heap).
    gc.freeze()
    with ProcessPoolExecutor(n - 1, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_open_chunk, (chunk, typ, fields)) for chunk in chunks]
        if meanwhile is not None:
            meanwhile()
        for token in todo[:own]:
            verifier.open(token, typ, fields)
        for chunk, future in zip(chunks, futures, strict=True):
            # packed (``pack_opened``); a token it does not give is opened when asked for
            verifier.adopt_packed(future.result(), typ, {token_digest(t): t for t in chunk})
    gc.unfreeze()
    return len(todo)


#: the helper's pipe (``start_prefetch``): up to 1 MiB at a time instead of Linux's 64 KiB, so
#: that the ~25 MB it sends in a cold check arrive in ~16x fewer reads (each a wake-up of both
#: processes and a copy into ``Connection``'s buffer)
PIPE_BYTES = 1 << 20


def widen_pipe(conn: Connection) -> None:
    """Ask for a ``PIPE_BYTES`` pipe buffer (Linux ``F_SETPIPE_SZ``); anything else keeps the
    default (the size changes only how many reads the data takes, never what arrives)."""
    try:
        import fcntl

        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (OSError, ValueError, ImportError):
        pass


def _prefetch_main(service: FleetService, conn: Connection, other: Connection | None = None) -> None:
    """The start-up check's other core (a forked process; ``FleetService.start_prefetch``).

    Reads every policy file and computes the snapshot key. When the snapshot on disk was
    stored under that key it holds exactly these tokens (the key covers them), so the
    answer is only the key (``tokens`` with None: a few bytes, not the ~15 MB of 10,000
    tokens); otherwise every token (or why its file could not be read) is sent, and then
    every token is opened (signature and schema, or the opened cache) and sent too
    (``opened``). Everything else — and every verdict — is decided in the console's
    process from these, exactly as without this process.
    ``other`` is the console's end of the pipe, inherited by the fork: closed at once, so
    that a send after the console has stopped listening fails instead of blocking forever.
    """
    if other is not None:
        other.close()
    # no cyclic garbage collection in this short-lived process: what it inherited is never
    # walked (nor copied), and its passes over what it makes and keeps -- each host check
    # leaves ~100 objects that live on, then the opened policies (~0.2 s of CPU for 10,000,
    # collecting nothing) -- are not spent; reference counting frees as usual. The forked
    # helper (``other`` given) exits right after, collector off (turned on, its first pass would
    # walk everything it made: ~65 ms for 10,000 VMs); called in-process without ``other``
    # (e.g. by a test), the caller's collector is as it was afterwards.
    collecting = gc.isenabled() and other is None
    gc.disable()
    gc.freeze()
    try:
        tokens: list[str | Reason] = []
        for rec in service._vms.values():
            if rec.policy_file:
                with contextlib.suppress(InputError):
                    service._read_token(rec)
            tokens.append(rec.token if rec.token_problem is None else rec.token_problem)
        snap = service._snapshot()
        key = service._snapshot_key() if snap is not None else ""
        memory = service._memory_bytes()
        hit = snap is not None and snap.matches(service._with_memory(key, memory))
        conn.send(("tokens", key, hit, None if hit else tokens))
        if hit:
            return
        # the host chains next, while the console starts its UI (the first rows wait for
        # them); sent as a snapshot stores them (``_capture``), with what the console needs
        # to judge and report them as if it had checked them itself (``_adopt_hosts``)
        from console.adapters.cache import FleetSnapshot

        at = service.at
        before = len(service.problems)
        hosts = {n: (service._host_check(n, at), v.attributes, v.cert_problem)
                 for n, v in service._hosts.items()}
        unread = [h.name for h in service.spec.hosts if h.cert_file and h.name not in service._host_certs] \
            if service.spec is not None else []
        conn.send(("hosts", at, FleetSnapshot.dumps(hosts), FleetSnapshot.dumps(
            (tuple(sorted(service._instant_set)), service.problems[before:], unread))))
        cache = service._opened_cache()
        opened: list[Portable] = []
        todo: list[str] = []
        for token in dict.fromkeys(t for t in tokens if t and isinstance(t, str)):
            got = cache.get(TYP_POLICY, token) if cache is not None else None
            if got is None:
                todo.append(token)
            else:
                opened.append(got)
        # from the cache first, then in chunks as they are opened; each opened token goes by
        # its digest only (the console has the token: ~15 MB less to pickle and unpickle),
        # packed (``pack_opened``: each owner chain and header once per chunk, marshal)
        conn.send(("opened", opened))
        fresh: list[Portable] = []
        try:
            for i in range(0, len(todo), 250):
                packed, done = pack_opened(todo[i:i + 250], TYP_POLICY, POLICY_FIELDS)
                fresh.extend(done)
                conn.send(("packed", packed))
            conn.send(("done",))
        except OSError:
            pass  # the console opened the rest itself (from the other end) and stopped listening
        if cache is not None and fresh:
            cache.put(TYP_POLICY, fresh)
            cache.save()
    except Exception:  # the console's process does the work itself then
        with contextlib.suppress(OSError, ValueError):
            conn.send(("failed",))
    finally:
        conn.close()
        if collecting:
            gc.enable()


#: the start-up check's first rows (more than a screen holds): with the helper, the console opens
#: their tokens itself while the helper checks the host chains, so they are decided first
FIRST_ROWS = 64

_make_view = maker(VMView)  # VMView(...) with every field, in order (core/records.py)


def _row_fields(pr: PolicyResult) -> tuple[str, str, tuple[Reason, ...]]:
    """What a VM's row shows of its policy: owner, summary, problems (one function, so a row
    from a snapshot and a row checked now say the same)."""
    pol = pr.policy
    return (pr.owner.label() if pr.owner else (pol.owner if pol else ""),
            pol.summary() if pol else "no valid policy", pr.reasons)


def _cert_instants(cert: x509.Certificate) -> tuple[dt.datetime, ...]:
    """When a check of ``cert`` may change: notBefore, notAfter, and when it becomes "expiring"."""
    after = cert.not_valid_after_utc
    return (cert.not_valid_before_utc, after, after - dt.timedelta(days=EXPIRING_DAYS))


#: a host chain result as cached: (computed for, instants it depends on, attributes, result)
_ChainEntry = tuple[dt.datetime, tuple[dt.datetime, ...], pki.HostAttributes | None, pki.ChainResult]


def _usable_chain(entry: object) -> _ChainEntry | None:
    """A cached chain entry of the right shape, else None (then the chain is checked)."""
    if type(entry) is not tuple or len(entry) != 4:
        return None
    computed, instants, attributes, chain = entry
    if (type(computed) is not dt.datetime or computed.tzinfo is None or type(instants) is not tuple
            or not all(type(i) is dt.datetime and i.tzinfo is not None for i in instants)
            or type(chain) is not pki.ChainResult
            or not (attributes is None or type(attributes) is pki.HostAttributes)):
        return None
    return computed, instants, attributes, chain


def _now() -> dt.datetime:
    """Now, the real time: decisions are never made at a truncated clock (see core/timekey.py
    for how caches stay shared between the instants that matter)."""
    return dt.datetime.now(dt.UTC)


@dataclass
class _VMRecord:
    """A VM as known from the fleet file and/or libvirt, with its policy token."""

    uuid: str
    name: str
    host: str
    token: str = ""
    token_problem: Reason | None = None  # the policy file or metadata could not be read
    file_token: str = ""  # the policy the fleet file names (policy_file), "" when none
    conflict: Reason | None = None  # the fleet file and the domain's <metadata> disagree
    state: str = "unknown"
    memory_mib: int = 0
    vcpus: int = 0
    from_facts: bool = False
    policy_file: str = ""  # read on first use when the service is lazy ("" = read already / none)


class FleetService:
    """A loaded fleet: hosts, VMs, trust stores, and decisions about them."""

    def __init__(self, spec: FleetSpec | None, *, path: str = "", readonly: bool = False,
                 at: dt.datetime | None = None, problems: Iterable[Problem] = (), eager: bool = True,
                 only_vm: str | None = None) -> None:
        self.spec = spec
        #: a one-pair answer offline (``escort explain/targets --offline``): keep only the
        #: VMs that ``only_vm`` (a UUID or name) can find -- exactly those ``_find_vm``
        #: would look at, so it finds the same VM or raises the same error. Never with a
        #: refresh (a host may report a VM under another name).
        self._only_vm = only_vm
        #: eager: check every host chain and open every policy on load (the console shows
        #: them all); lazy: only what a question needs (``escort explain`` on a big fleet)
        self.eager = eager
        self.path = path
        self.readonly = readonly or bool(spec and spec.readonly)
        self._fixed_at = at
        self.problems: list[Problem] = list(problems)
        self._fatal: list[Problem] = [p for p in self.problems if p.reason.severity == "error"]
        self.trust: TrustStore | None = None
        self.owners: TrustStore | None = None
        self.policy_names: dict[str, str] = dict(spec.policy_names) if spec else {}
        self._hosts: dict[str, HostView] = {}
        self._host_certs: dict[str, tuple[x509.Certificate, list[x509.Certificate]]] = {}
        self._views_at: dt.datetime | None = None
        self._vms: dict[str, _VMRecord] = {}
        self._grant_tokens: list[tuple[str, str]] = []
        self._checks: dict[tuple[str], tuple[dt.datetime, HostCheck]] = {}
        #: host name -> (at, chain): the views, the matrix and explain share one check
        self._chains: dict[str, tuple[dt.datetime, pki.ChainResult | None]] = {}
        self._matrix: Matrix | None = None
        self._matrix_at: dt.datetime | None = None
        self._policies = PolicyBook(None)
        self._grants = GrantBook(None)
        self._memory: PolicyMemory | None = None
        self._memory_path: Path | None = None  # read on first need (``_ensure_memory``)
        self._snap: FleetSnapshot | None = None
        #: from a reused snapshot: each VM's row fields, and its check still pickled
        self._restored: dict[str, tuple[str, str, tuple[Reason, ...]]] = {}
        self._lazy: dict[str, tuple[int, int]] = {}
        #: the start-up check's helper process and the read end of its pipe (``start_prefetch``)
        self._prefetch: tuple[multiprocessing.process.BaseProcess, Connection] | None = None
        self._lazy_blob = memoryview(b"")
        #: a restored snapshot's second part, still pickled (``_complete_restore``), the host
        #: checks from it (``_restore_hosts``) and the problems it brought
        self._rest: tuple[memoryview, bytes] | None = None
        #: the second part's SHA-256 compared on a thread (hashlib releases the GIL) while the
        #: first rows' verdicts are painted: the thread and its answer (``_complete_restore``)
        self._rest_hash: tuple[threading.Thread, list[bool]] | None = None
        self._hosts_blob = b""
        self._snap_problems: list[Problem] = []
        #: the snapshot read while the console starts (``_preload_snapshot``): thread, result
        self._preloaded: tuple[threading.Thread, list[Any]] | None = None
        self._lazy_at: dt.datetime | None = None
        #: how the last start-up check went: "snapshot" (reused), "computed", "" (not run)
        self.check_source = ""
        #: True once the running start-up check has yielded its last verdict (and the matrix is
        #: in place): the steps ``check_in_steps`` yields after that are its bookkeeping
        #: (policy memory, snapshot, opened cache; ``_after_check``). A caller may end the check
        #: for its users there and keep stepping the generator (or close it: nothing is saved).
        self.verdicts_final = False
        #: a check's last verdict is out and its bookkeeping will write the policies it
        #: accepted: until then nothing else writes them (``_remember``)
        self._remember_due = False
        self._pending: dict[str, SeenPolicy] = {}
        #: every instant at which a time-dependent answer may change, of every certificate,
        #: CRL and token a cached answer was computed from (core/timekey.py)
        self._instant_set: set[dt.datetime] = set()
        self._instants: tuple[dt.datetime, ...] | None = ()  # sorted; None: to be re-sorted
        self._noted: set[str] = set()  # token digests / chain keys already noted
        self._noted_chains: set[tuple[str, ...]] = set()  # x5c chains whose certificates are noted
        self._noted_windows: set[tuple[int, int]] = set()  # (nbf, exp) pairs whose instants are noted
        self._policy_cache: dict[str, tuple[dt.datetime, str, PolicyResult]] = {}
        self._grant_cache: tuple[dt.datetime, int, list[GrantResult]] | None = None
        #: lazy services read host certificates, policy files and grants on first use;
        #: a file that cannot be read then is an InputError (the CLI's exit 2)
        self._cert_pending: set[str] = set()
        self._generation = 0  # bumped by every apply_facts: a step-wise check started before is stale
        self._strict = False
        #: the console keeps opened policies across runs (adapters/cache.py); None = off
        self.use_cache = False
        self._cache: OpenedCache | None = None
        self.cache_notice = ""  # load_strict: a file read lazily and unreadable is an InputError
        self._vm_checks: dict[tuple[object, ...], tuple[dt.datetime, VMCheck]] = {}
        self._known: tuple[TrustStore, dict[str, str]] | None = None
        self._names: tuple[int, dict[str, list[_VMRecord]]] | None = None  # VM name -> records
        self._grants_pending: tuple[str, ...] | None = None
        #: ``targets`` of a one-VM service: host chain results from escort's cache
        #: (``_adopt_chains``): hosts adopted, and each host's certificate file as read
        self._chain_hits: set[str] = set()
        self._cert_bytes: dict[str, tuple[str, bytes]] = {}
        if spec is not None:
            self._load(spec)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | os.PathLike[str], *, readonly: bool = False,
             at: dt.datetime | None = None, eager: bool = True) -> FleetService:
        """Load for the UI: problems are collected, never raised."""
        try:
            spec = load_fleet(path)
        except InputError as exc:
            return cls(None, path=str(path), readonly=readonly, at=at,
                       problems=[Problem(str(path), reason("fleet.unusable", str(exc),
                                                          "fix the fleet file (see docs/FLEET.md)"))])
        service = cls(spec, path=str(path), readonly=readonly, at=at, eager=eager)
        from console.adapters import parsecache

        service.cache_notice = next(iter(parsecache.notices), "")  # the console says it once
        return service

    @classmethod
    def load_strict(cls, path: str | os.PathLike[str], *, readonly: bool = False,
                    at: dt.datetime | None = None, eager: bool = False,
                    only_vm: str | None = None) -> FleetService:
        """Load for the CLI: the first unusable input is an InputError (exit 2).

        Lazy by default: ``escort explain`` checks one host chain and one policy, not
        the whole fleet's. ``only_vm``: the one VM an offline answer is about (the
        whole fleet file is still read and checked).
        """
        keep = None if only_vm is None else Only(frozenset({only_vm, only_vm.lower()}), only_vm)
        service = cls(load_fleet(path, keep_vm=keep), path=str(path), readonly=readonly, at=at, eager=eager,
                      only_vm=only_vm)
        service._strict = True
        if service._fatal:
            first = service._fatal[0]
            more = f" (and {len(service._fatal) - 1} more problem(s))" if len(service._fatal) > 1 else ""
            msg = first.reason.message.rstrip(".")
            raise InputError((msg if first.source in msg else f"{first.source}: {msg}") + more)
        return service

    def _problem(self, source: str, code: str, message: str, fix: str = "", *, fatal: bool = False,
                 severity: str = "error") -> Reason:
        why = reason(code, message, fix, "warning" if severity == "warning" else "error")
        problem = Problem(source, why)
        self.problems.append(problem)
        if fatal:
            self._fatal.append(problem)
        return why

    def _load(self, spec: FleetSpec) -> None:
        at = self.at
        self.trust = self._store(spec.trust_dir, "host CA", at)
        self.owners = self._store(spec.owners_trust_dir, "owners' CA", at)
        self._note_store(self.trust)
        self._note_store(self.owners)
        self._policies = PolicyBook(self.owners)
        self._grants = GrantBook(self.owners)
        self._open_memory()
        for h in spec.hosts:
            self._hosts[h.name] = HostView(spec=h)
        only = self._only_vm
        keys = {only, only.lower()} if only is not None else set()
        for v in spec.vms:
            if only is not None and v.uuid not in keys and v.name != only:
                continue
            rec = _VMRecord(v.uuid, v.name, v.host, memory_mib=v.memory_mib, vcpus=v.vcpus,
                            policy_file=v.policy_file)
            if self.eager:
                self._read_token(rec)
            self._vms[v.uuid] = rec
        # host chains are checked here while worker processes check policy signatures
        if self.eager:
            open_tokens_parallel(self._policies.envelopes, (r.token for r in self._vms.values()),
                                 TYP_POLICY, POLICY_FIELDS,
                                 meanwhile=lambda: self._load_host_certs(spec.hosts),
                                 meanwhile_weight=HOST_CHECK_WEIGHT * len(spec.hosts))
            self._load_grants(spec.grant_files, at)
        else:
            self._cert_pending = {h.name for h in spec.hosts if h.cert_file}
            self._grants_pending = tuple(spec.grant_files)
        self._views_at = at if self.eager else None

    def _read_token(self, rec: _VMRecord) -> None:
        """Read the VM's policy file (once); lazily, an unreadable one is an InputError.
        (A restored snapshot's tokens first: the key it was found under covers them.)"""
        if self._rest is not None:
            self._complete_restore()
        path, rec.policy_file = rec.policy_file, ""
        if not path:
            return
        try:
            rec.token = read_limited(path, what="policy").decode("ascii").strip()
            rec.file_token = rec.token
        except (InputError, UnicodeDecodeError) as exc:
            msg = str(exc) if isinstance(exc, InputError) else f"{path}: not a policy token"
            rec.token_problem = self._problem(path, "policy.unreadable", msg,
                                              "fix policy_file for this VM", fatal=True)
            if self._strict:
                raise InputError(msg) from exc

    def _ensure_cert(self, name: str) -> None:
        if name in self._cert_pending:
            self._cert_pending.discard(name)
            self._load_host_cert(self._hosts[name].spec)
            view = self._hosts[name]
            if self._strict and view.cert_problem is not None \
                    and view.cert_problem.code == "cert.unreadable" and name not in self._host_certs:
                raise InputError(view.cert_problem.message)

    def _ensure_grants(self) -> None:
        if self._grants_pending is not None:
            pending, self._grants_pending = self._grants_pending, None
            before = len(self._fatal)
            self._load_grants(pending, self.at)
            if self._strict and len(self._fatal) > before:
                raise InputError(self._fatal[before].reason.message)

    def _load_grants(self, entries: Iterable[str], at: dt.datetime) -> None:
        for source in self._grant_files(entries):
            try:
                token = read_limited(source, what="grant").decode("ascii").strip()
            except (InputError, UnicodeDecodeError) as exc:
                msg = str(exc) if isinstance(exc, InputError) else f"{source}: not a grant token"
                self._problem(source, "grant.unreadable", msg, "fix the fleet file's grants", fatal=True)
                continue
            self._grant_tokens.append((source, token))
            result = self._grants.verify(token, at, source)
            broken = [r for r in result.reasons if r.code not in {"grant.expired", "grant.not_yet_valid"}]
            if broken:
                self._problem(source, broken[0].code, f"grant {Path(source).name}: {broken[0].message}",
                              broken[0].fix, severity="warning")

    def _grant_files(self, entries: Iterable[str]) -> list[str]:
        out: list[str] = []
        for entry in entries:
            p = Path(entry)
            if p.is_dir():
                out.extend(str(f) for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith("."))
            else:
                out.append(entry)
        return out

    def _store(self, directory: str, what: str, at: dt.datetime) -> TrustStore | None:
        try:
            store, problems = load_trust_store(
                directory, at, missing_crl=self.spec.missing_crl if self.spec else "refuse")
        except InputError as exc:
            self._problem(directory, "trust.unusable", f"{what} trust directory: {exc}",
                          f"point the fleet file at a directory with the {what} certificate(s)", fatal=True)
            return None
        self.problems.extend(problems)
        return store

    def _load_host_certs(self, hosts: Iterable[HostSpec]) -> None:
        for h in hosts:
            self._load_host_cert(h)

    def _load_host_cert(self, h: HostSpec) -> None:
        view = self._hosts[h.name]
        if not h.cert_file:
            return
        stashed = self._cert_bytes.get(h.name)
        try:
            data = stashed[1] if stashed is not None else read_limited(h.cert_file, what="certificate")
            certs = pki.load_certificates(data, h.cert_file)
        except InputError as exc:
            view.cert_problem = self._problem(h.cert_file, "cert.unreadable", str(exc),
                                              f"fix cert_file for host {h.name}", fatal=True)
            return
        self._set_cert(h.name, certs[0], certs[1:])

    def _set_cert(self, name: str, leaf: x509.Certificate, rest: list[x509.Certificate]) -> None:
        view = self._hosts[name]
        self._cert_pending.discard(name)  # what a refresh read replaces the local copy
        self._host_certs[name] = (leaf, rest)
        for c in (leaf, *rest):
            self._note_cert(c)
        self._chains.pop(name, None)
        view.cert_problem = None
        try:
            view.attributes = pki.host_attributes(leaf, self.policy_names)
        except Exception as exc:  # untrusted certificate bytes: any parse error is a problem
            view.cert_problem = reason("cert.unreadable", f"host {name}: certificate unusable ({exc})",
                                       "reissue the host certificate")
            view.attributes = None
        view.chain = self._verify_host(name, self.at) if self.eager else None
        if not self.eager:
            self._views_at = None  # hosts() fills the chains in when views are asked for

    def _verify_host(self, name: str, at: dt.datetime) -> pki.ChainResult | None:
        cached = self._chains.get(name)
        if cached is not None and self._fresh(cached[0], at):
            return cached[1]  # (a snapshot's chain: the certificate is read only to check it anew)
        self._ensure_cert(name)
        cached = self._chains.get(name)
        if cached is not None and self._fresh(cached[0], at):
            return cached[1]
        got = self._host_certs.get(name)
        if got is None and name in self._chain_hits:  # adopted, but not fresh for ``at``: read it
            self._chain_hits.discard(name)
            self._load_host_cert(self._hosts[name].spec)
            got = self._host_certs.get(name)
        if got is None or self.trust is None:
            return None
        try:
            chain = self.trust.verify_host(got[0], at, intermediates=got[1])
        except Exception as exc:  # one damaged certificate must not take the console down
            chain = pki.ChainResult(False, (reason("cert.malformed",
                                                   f"host {name}: certificate cannot be checked ({exc})",
                                                   "reissue the host certificate"),))
        self._chains[name] = (at, chain)
        return chain

    # ------------------------------------------------------------------ attributes
    @property
    def at(self) -> dt.datetime:
        """The time decisions are made for (fixed by ``--at``, else now)."""
        return self._fixed_at or _now()

    # ------------------------------------------------------------------ time
    def _note(self, instants: Iterable[dt.datetime | None]) -> None:
        before = len(self._instant_set)
        self._instant_set.update(boundaries(instants))
        if len(self._instant_set) != before:
            self._instants = None

    def _note_cert(self, cert: x509.Certificate) -> None:
        instants = _cert_instants(cert)
        if all(t.tzinfo is dt.UTC for t in instants):  # (as cryptography gives them: ``boundaries``
            before = len(self._instant_set)            # would return these very objects)
            self._instant_set.update(instants)
            if len(self._instant_set) != before:
                self._instants = None
            return
        self._note(instants)

    def _note_store(self, store: TrustStore | None) -> None:
        if store is None:
            return
        soon = dt.timedelta(days=EXPIRING_DAYS)
        for n in store.nodes():
            self._note((n.info.not_before, n.info.not_after, n.info.not_after - soon))
        for crl in getattr(store, "crls", ()):
            self._note((crl.last_update, crl.next_update, *crl.revoked.values()))

    def _note_token(self, token: str, typ: str, fields: frozenset[str], verifier: EnvelopeVerifier) -> None:
        """A token's nbf (and nbf minus the skew allowance), exp and its signers' certificates."""
        self._note_opened(verifier.open(token, typ, fields))

    def _note_opened(self, opened: Opened) -> None:
        """``_note_token`` for a token opened already."""
        if opened.digest in self._noted:
            return
        self._noted.add(opened.digest)
        payload = opened.payload or {}
        nbf, exp = payload.get("nbf"), payload.get("exp")
        if type(nbf) is not int or type(exp) is not int:  # (exact ints: True == 1, but no instant)
            self._note_window(payload)
        elif (nbf, exp) not in self._noted_windows:  # (most policies share their window)
            self._noted_windows.add((nbf, exp))
            self._note_window(payload)
        if opened.chain_key not in self._noted_chains:
            self._noted_chains.add(opened.chain_key)
            for c in opened.certs:
                self._note_cert(c)

    def _note_window(self, payload: Mapping[str, Any]) -> None:
        """A token's nbf (and nbf minus the skew allowance) and exp as instants."""
        before = len(self._instant_set)
        for claim in ("nbf", "exp"):
            value = payload.get(claim)
            if isinstance(value, int) and not isinstance(value, bool):
                try:
                    when = dt.datetime.fromtimestamp(value, dt.UTC)
                    # aware UTC instants already: what ``boundaries`` would make of them
                    self._instant_set.update((when, when - NBF_SKEW) if claim == "nbf" else (when,))
                except (OverflowError, OSError, ValueError):
                    pass
        if len(self._instant_set) != before:
            self._instants = None

    def _fresh(self, stored: dt.datetime | None, at: dt.datetime) -> bool:
        """A result computed at ``stored`` is the result at ``at``: no instant that any
        cached answer depends on lies between them (core/timekey.py). Every answer is
        computed at the exact time it is asked for; only reuse goes by interval."""
        if stored is None:
            return False
        if stored == at:
            return True
        if self._fixed_at is not None:
            return False
        if self._instants is None:
            self._instants = tuple(sorted(self._instant_set))
        return time_key(self._instants, stored) == time_key(self._instants, at)

    @property
    def kind(self) -> FleetKind:
        return self.spec.kind if self.spec else "real"

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else ""

    @property
    def admins(self) -> tuple[AdminSpec, ...]:
        return self.spec.admins if self.spec else ()

    def require_writable(self, action: str) -> None:
        """Raise ReadOnlyError for any changing ``action`` in read-only mode."""
        if self.readonly:
            raise ReadOnlyError(f"read-only mode: {action} is disabled")

    # ------------------------------------------------------------------ views
    def hosts(self) -> list[HostView]:
        at = self.at
        if not self._fresh(self._views_at, at):
            # certificates expire while the console stays open: re-check at the new minute
            for name in list(self._cert_pending):
                self._ensure_cert(name)
            for name, view in self._hosts.items():
                if name in self._host_certs:
                    view.chain = self._verify_host(name, at)
            self._views_at = at
        return list(self._hosts.values())

    def vms(self) -> list[VMView]:
        at = self.at
        matrix = self._current_matrix(at)
        return [self._view_of(rec, self._row(rec, at), matrix.targets.get(rec.uuid, ()))
                for rec in self._vms.values()]

    def _row(self, rec: _VMRecord, at: dt.datetime) -> tuple[str, str, tuple[Reason, ...]]:
        """The VM's row fields: from a reused snapshot while it holds for the VM, else checked."""
        fields = self._restored.get(rec.uuid)
        if fields is not None and self._fresh(self._lazy_at, at):
            return fields
        return _row_fields(self._policy(rec, at))

    def host_stubs(self) -> list[HostView]:
        """The hosts' views as they are, without checking a certificate (console rows first)."""
        return list(self._hosts.values())

    def vm_stubs(self) -> list[VMView]:
        """Every VM as the fleet file (or the last refresh) names it, nothing checked yet:
        the console's rows before their verdicts (``checking=True``)."""
        return [VMView(uuid=r.uuid, name=r.name, host=r.host, state=r.state, memory_mib=r.memory_mib,
                       vcpus=r.vcpus, policy_summary="checking…", checking=True)
                for r in self._vms.values()]

    def check_in_steps(self, *, budget_s: float = 0.015) -> Iterator[list[VMView]]:
        """``_check_in_steps`` without cyclic garbage collection while it runs.

        A cold 10,000-VM check makes millions of objects that live on (views, checks, opened
        policies): the collector's passes over them found nothing here and cost ~0.3-0.4 s
        of CPU (three full passes of 40-110 ms each and ~100 younger ones), on the core the
        verdicts wait for. Reference counting still frees everything as usual. When the check
        ends (or is closed), everything it made goes straight to the oldest generation
        (``gc.freeze`` then ``gc.unfreeze``: no young-generation pass over a million objects
        when collection resumes), the heap is handed back to the collector (what was frozen
        before too) and collection is on again if it was on before. Close the generator when
        you stop stepping it (the console does): one left suspended holds collection off until
        it is freed."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            yield from self._check_in_steps(budget_s=budget_s)
        finally:
            gc.freeze()
            gc.unfreeze()
            if enabled:
                gc.enable()

    def _check_in_steps(self, *, budget_s: float = 0.015) -> Iterator[list[VMView]]:
        """Check the whole fleet in small steps, yielding the VMs whose verdicts are done.

        Host certificates and chains first, then the VMs' policies, a few at a time: each
        step takes about ``budget_s`` so the console stays responsive and paints verdicts
        as they arrive. The views yielded are exactly what ``vms()`` returns (same policy
        results, same allowed-target matrix); afterwards ``vms()`` and ``matrix()`` answer
        from the cache. An empty list means "hosts still being checked".

        With the cache on (``use_cache``), the last check's results are reused when every
        input is byte for byte the same and no instant that matters has passed since
        (``_restore``; adapters/cache.py ``FleetSnapshot``); otherwise everything is
        checked and the snapshot rewritten -- after the last verdict: the last verdicts are
        yielded with ``verdicts_final`` set, and the steps after them (``[]``) are the check's
        bookkeeping (``_after_check``).
        """
        at = self.at
        generation = self._generation
        self.verdicts_final = False
        self._remember_due = False
        clock = time.perf_counter
        start = clock()
        snap = self._snapshot()
        key = ""
        problems_before = len(self.problems)
        helper, self._prefetch = self._prefetch, None
        conn: Connection | None = None
        reusable = True
        from_snapshot = False  # the helper found the snapshot's key: the tokens are the snapshot's
        if helper is not None:
            conn = helper[1]
            message = yield from self._receive(conn)
            # the helper read the files of the VMs as the fleet file lists them: only while no
            # refresh has changed the VMs since (a token goes to the VM at the same place)
            if (message is not None and message[0] == "tokens" and self._generation == 0
                    and (message[3] is None or len(message[3]) == len(self._vms))):
                _, key, reusable, tokens = message
                if tokens is None:
                    from_snapshot = reusable and snap is not None
                else:
                    for rec, token in zip(list(self._vms.values()), tokens, strict=True):
                        self._adopt_token(rec, token)
            else:
                conn = None
        if snap is not None:
            if not from_snapshot:
                yield from self._read_tokens(start, budget_s)
                start = clock()
                key = key or self._snapshot_key()
            memory = self._memory_bytes()
            state = None
            if reusable:
                state = yield from self._load_snapshot(snap, self._with_memory(key, memory))
            if state is not None and self._restore(state, at, rest_now=not from_snapshot):
                self.check_source = "snapshot"
                matrix = self._current_matrix(at)
                ready: list[VMView] = []
                size = 256  # the first rows on screen get their verdicts first, then in steps
                whole = True
                for rec in self._vms.values():
                    ready.append(self._view_of(rec, self._row(rec, at), matrix.targets.get(rec.uuid, ())))
                    if len(ready) == size:
                        yield ready
                        ready, size = [], 1000
                        while self._rest_hash is not None and self._rest_hash[0].is_alive():
                            self._rest_hash[0].join(0.002)  # (its hash, beside the event loop)
                            yield []
                        whole = self._complete_restore()  # the tokens, checks and hosts: after the first rows
                        if not whole:
                            break
                if whole and ready:
                    yield ready
                if whole and self._complete_restore():
                    if conn is not None:
                        conn.close()
                    if generation == self._generation:  # (a refresh meanwhile: hosts are checked anew)
                        self._restore_hosts(at)
                    return
                # the snapshot's second part is not what was stored: nothing of it is kept, and
                # every verdict (those shown too) is checked anew below
            if from_snapshot:
                # the snapshot named these files' tokens but cannot answer (an instant passed, or
                # it changed since the helper looked): read them here and key them anew
                yield from self._read_tokens(start, budget_s)
                start = clock()
                key = self._snapshot_key()
        self.check_source = "computed"
        if conn is not None:
            # the helper checks the host chains first: open the first rows' tokens (the rows on
            # screen then get their verdicts as soon as the hosts are in, not with the helper's
            # first tokens), then from the last one back until they arrive (whatever it does
            # not send usably is checked below, here)
            waiting = [t for t in dict.fromkeys(r.token for r in self._vms.values() if r.token)
                       if not self._policies.envelopes.is_open(t, TYP_POLICY)]
            waiting = waiting[FIRST_ROWS:] + waiting[:FIRST_ROWS][::-1]  # (popped from the end)
            if waiting:
                # the policy memory every verdict is decided with: read now, while the host
                # chains are not in yet, rather than by the first verdict after they are
                self._ensure_memory()
            while conn is not None:
                got: Any = None
                try:
                    got = conn.recv() if conn.poll(0 if waiting else 0.005) else None
                except (EOFError, OSError):
                    got = ("failed",)
                if got is not None:
                    if (isinstance(got, tuple) and len(got) == 4 and got[0] == "hosts"
                            and generation == self._generation):  # (a refresh meanwhile: checked anew)
                        self._adopt_hosts(got[1], got[2], got[3], at)
                    else:
                        conn.close()
                        conn = None
                    break
                for _ in range(8):
                    if waiting:
                        self._policies.envelopes.open(waiting.pop(), TYP_POLICY, POLICY_FIELDS)
                if clock() - start > budget_s:
                    yield []
                    start = clock()
        for name in self._hosts:
            self._host_check(name, at)
            if clock() - start > budget_s:
                yield []
                start = clock()
        hosts = [self._host_check(n, at) for n in self._hosts]
        index = HostIndex.build(hosts)
        groups: Groups = {}
        targets: dict[str, tuple[str, ...]] = {}
        home: set[str] = set()
        done: list[VMView] = []
        cache = self._opened_cache()
        envelopes = self._policies.envelopes
        fresh: list[str] = []

        #: each VM's full check as decided, with its row's fields when they are its check's
        #: (what the snapshot stores: ``_capture``)
        decided: list[tuple[VMCheck, tuple[str, str, tuple[Reason, ...]] | None]] = []

        def decide(rec: _VMRecord) -> None:
            pr = self._policy(rec, at)
            check = self._vm_check(rec, at, pr)
            allowed, at_home = allowed_row(check, index, groups)
            targets[rec.uuid] = allowed
            if at_home:
                home.add(rec.uuid)
            fields = _row_fields(pr)
            decided.append((check, fields if check.policy is pr else None))
            done.append(self._view_of(rec, fields, allowed))  # (``_view``)

        records = list(self._vms.values())
        if conn is not None:
            # the helper opens tokens from the first on (signatures, on the other core) and
            # sends them in chunks; this process decides the VMs in the console's order as
            # soon as their tokens are open (the first rows on screen get their verdicts
            # first) and, when the next one is not open yet, decides from the last one back
            # (opening their tokens) until they meet. Whatever neither did is opened here, as
            # without the helper.
            cache = None  # the helper keeps the opened cache up to date
            todo = [t for t in dict.fromkeys(r.token for r in records if r.token)
                    if not envelopes.is_open(t, TYP_POLICY)]
            # the helper names each token it opened by its digest: the digest of a token of
            # this process (anything else is not adopted: opened here, below)
            by_digest = {token_digest(t): t for t in todo}
            helper_ok = True
            # the VMs from ``i`` to ``j`` are left to decide: the helper's tokens are decided from
            # the front (``i``), the ones this process opens from the back (``j``), each as soon
            # as it is open. (Opened here but decided only when the front reached them, they
            # would all be left for the end, this process deciding them alone while the helper
            # opens what is open already; meanwhile it would have opened more of them itself.)
            i, j = 0, len(records)
            while i < j:
                if helper_ok:
                    try:
                        while conn.poll(0):
                            message = conn.recv()
                            if message[0] == "packed" and isinstance(message[1], bytes):
                                self._policies.adopt_packed(message[1], by_digest)
                            elif message[0] == "opened" and isinstance(message[1], list):
                                for portable in message[1]:
                                    token = (by_digest.get(portable[0]) if type(portable) is tuple
                                             and len(portable) == 4 and type(portable[0]) is str
                                             else None)
                                    if token is not None and not envelopes.is_open(token, TYP_POLICY):
                                        envelopes.adopt(token, TYP_POLICY, portable)
                            else:
                                helper_ok = False  # done or failed: the rest is opened here
                                break
                    except (EOFError, OSError):
                        helper_ok = False
                first = i  # at least one VM per step, whatever the budget (progress)
                while i < j and (i == first or clock() - start <= budget_s):
                    rec = records[i]
                    if (helper_ok and rec.token and not rec.policy_file
                            and not envelopes.is_open(rec.token, TYP_POLICY)):
                        break  # not open yet: the helper is on it
                    decide(rec)
                    i += 1
                if i < j and (i == first or clock() - start <= budget_s):
                    # the front waits for the helper: decide from the last VM back (first those
                    # whose tokens were opened here while the helper checked the host chains;
                    # then ``decide`` opens each one's token itself)
                    for _ in range(8):
                        if i >= j:
                            break
                        decide(records[j - 1])
                        j -= 1
                if clock() - start > budget_s:
                    yield done
                    done = []
                    start = clock()
            conn.close()
        else:
            for rec in records:
                if rec.policy_file:
                    self._read_token(rec)
                if cache is not None and rec.token and not envelopes.is_open(rec.token, TYP_POLICY):
                    hit = cache.get(TYP_POLICY, rec.token)
                    if hit is not None:
                        envelopes.adopt(rec.token, TYP_POLICY, hit)
                    else:
                        fresh.append(rec.token)
                decide(rec)
                if clock() - start > budget_s:
                    yield done
                    done = []
                    start = clock()
        # Every verdict is decided. The matrix goes in place and the last verdicts are yielded
        # with ``verdicts_final``: the check is over for the console's users from here on.
        # Its bookkeeping follows in steps (``_after_check``), from what is taken here, by
        # reference, as it was decided: whatever the console does meanwhile (a decision at
        # another time, a refresh, another console writing the policy memory) never changes
        # what is saved -- it only stops a save that would no longer be what was decided.
        final = self._fresh(at, self.at) and generation == self._generation
        if final:
            self._matrix = Matrix(targets, len(groups), len(index.names), home)
            self._matrix_at = at
            self._views_at = at
        memory_before = self._memory.seen if self._memory is not None else None
        pending = dict(self._pending)
        decided_state = None
        if final and snap is not None and key and self._matrix is not None:
            decided_state = (decided, self._matrix, tuple(self._instant_set), self.problems[problems_before:],
                             {n: (self._checks[(n,)][1], v.attributes, v.cert_problem)
                              for n, v in self._hosts.items() if (n,) in self._checks})
        self.verdicts_final = True
        self._remember_due = True  # (the write is the bookkeeping's: decisions meanwhile leave it)
        try:
            yield done
            yield from self._after_check(at, generation, budget_s, snap, key, memory_before, pending,
                                         decided_state, cache if fresh else None, fresh)
        finally:
            if self._remember_due:  # closed before the bookkeeping: the policies accepted are
                self._remember(now=True)  # remembered all the same

    def _after_check(self, at: dt.datetime, generation: int, budget_s: float, snap: FleetSnapshot | None,
                     key: str, memory_before: Mapping[str, SeenPolicy] | None,
                     pending: dict[str, SeenPolicy], decided_state: tuple[Any, ...] | None,
                     cache: OpenedCache | None, fresh: list[str]) -> Iterator[list[VMView]]:
        """The start-up check's bookkeeping after its last verdict, in steps of about
        ``budget_s`` (each yields ``[]``): the policies accepted go to the memory (one write),
        the tokens opened here to the opened cache, and what was decided to the snapshot.

        The memory is written even when the steps are cut short (a refresh, the console
        quitting): a policy accepted is remembered as before. The snapshot is written only
        when nothing can make it differ from what was decided: the memory on disk is exactly
        the one the verdicts were decided with plus the policies they accepted (no other
        console's entries merged in meanwhile), and no refresh has changed the fleet since
        (``generation``); it stores ``decided_state``, the checks, matrix, instants, problems
        and host checks as they were when the last verdict was yielded."""
        self._remember(now=True)  # the policies accepted in this check (one write; before any step)
        if cache is not None and fresh:
            opened = [self._policies.envelopes.open(t, TYP_POLICY, POLICY_FIELDS) for t in fresh]
            cache.put(TYP_POLICY, [(o.digest, o.payload, o.reasons, o.chain_key) for o in opened])
            cache.save()
        if cache is not None and cache.notice:
            self.cache_notice = cache.notice
        if snap is None or decided_state is None or self._pending or generation != self._generation:
            return
        memory = self._memory
        if memory_before is not None and memory is not None:  # (the verdicts were decided with it)
            if memory.problem or ((memory.seen is not memory_before or pending)
                                  and memory.seen != merge_seen(memory_before, pending)):
                return  # another console's entries are in the memory now: not what was decided with
            raw = memory.raw  # its bytes as the verdicts were decided with it (plus what they accepted)
        else:
            raw = self._memory_bytes()
        full_key = self._with_memory(key, raw)
        inputs = self._vm_inputs()  # (the records change only with a refresh: ``generation``)
        first, rest = yield from self._capture(at, decided_state, inputs, time.perf_counter(), budget_s)
        if generation != self._generation:
            return
        yield []
        dumped = snap.dump_split(first, rest)
        if dumped is None or generation != self._generation:
            return
        yield []
        snap.save_dumped(full_key, *dumped)
        if snap.notice and not self.cache_notice:
            self.cache_notice = snap.notice

    def start_prefetch(self) -> bool:
        """Start the start-up check's helper process (``_prefetch_main``) on the other core.

        Only before the console starts any thread (a fork then is safe) and only for a
        lazy service that has not checked anything yet; ``check_in_steps`` uses what it
        sends and does everything itself if it sends nothing usable. True if started.
        """
        import multiprocessing

        if (self._prefetch is not None or self.eager or self.spec is None or self._generation
                or threading.active_count() > 1 or (os.cpu_count() or 1) < 2
                or "fork" not in multiprocessing.get_all_start_methods()):
            return False
        ctx = multiprocessing.get_context("fork")
        receive, send = ctx.Pipe(duplex=False)
        widen_pipe(receive)
        proc = ctx.Process(target=_prefetch_main, args=(self, send, receive), daemon=True,
                           name="escort-check")
        proc.start()
        send.close()
        self._prefetch = (proc, receive)
        self._preload_snapshot()
        return True

    def _preload_snapshot(self) -> None:
        """Read the fleet's snapshot on a thread while the console starts (its first part is a
        few MB; the rest stays bytes), so that it is there when the helper's key is. It is
        used only if the key in its header is exactly that key (``_load_snapshot``)."""
        if not self._caching() or not self.path or self._generation:
            return
        path = self.path
        box: list[Any] = []

        def load() -> None:
            try:
                from console.adapters.cache import FleetSnapshot

                snap = FleetSnapshot(path)
                got = snap.load_split(None)
                box.append((snap.path, snap.key_found, got) if got is not None else None)
            except Exception:  # no snapshot then: the check loads or computes as without this
                box.append(None)

        worker = threading.Thread(target=load, name="escort-snapshot", daemon=True)
        worker.start()
        self._preloaded = (worker, box)

    @staticmethod
    def _receive(conn: Connection) -> Generator[list[VMView], None, tuple[Any, ...] | None]:
        """The helper's next message, waiting in steps (``[]``: nothing decided yet); None when
        it has nothing (failed, exited)."""
        while True:
            try:
                if conn.poll(0.005):
                    message = conn.recv()
                    if isinstance(message, tuple) and message and message[0] != "failed":
                        return message
                    break
            except (EOFError, OSError):
                break
            yield []
        conn.close()
        return None

    def _load_snapshot(self, snap: FleetSnapshot, key: str) -> Generator[list[VMView], None, Any]:
        """``snap.load_split(key)`` on a thread of its own, yielding ``[]`` while it runs.

        Reading, hashing and unpickling a 10,000-VM snapshot is ~0.1-0.2 s in one call; on
        the console's event loop that would hold up everything the screen still has to do
        (first paint, the footer's start-up recomposes) until it is done. The load touches
        nothing of this service (a file in, objects out), so it runs beside the loop. What
        ``_preload_snapshot`` read is used instead when it was stored under ``key``."""
        preloaded, self._preloaded = self._preloaded, None
        if preloaded is not None:
            while preloaded[0].is_alive():
                preloaded[0].join(0.005)
                if preloaded[0].is_alive():
                    yield []
            got = preloaded[1][0] if preloaded[1] else None
            if got is not None and got[0] == snap.path and got[1] == key:
                return got[2]
        box: list[Any] = []

        def load() -> None:
            try:
                box.append(snap.load_split(key))
            except Exception:  # any failure: no snapshot, the fleet is checked anew
                box.append(None)

        worker = threading.Thread(target=load, name="escort-snapshot", daemon=True)
        worker.start()
        while True:
            worker.join(0.005)  # (waiting releases the GIL: the load gets the core meanwhile)
            if not worker.is_alive():
                return box[0] if box else None
            yield []

    def _read_tokens(self, start: float, budget_s: float) -> Generator[list[VMView], None, None]:
        """Read every policy file not read yet, yielding ``[]`` about every ``budget_s``."""
        clock = time.perf_counter
        for i, rec in enumerate(list(self._vms.values())):
            if rec.policy_file:
                self._read_token(rec)
            if i % 256 == 0 and clock() - start > budget_s:
                yield []
                start = clock()

    def _adopt_token(self, rec: _VMRecord, token: object) -> None:
        """What the helper read from the VM's policy file: the token, or why it could not be
        read (recorded as ``_read_token`` records it, so it is what the key was made of)."""
        if not rec.policy_file:
            return
        if isinstance(token, str):
            rec.token = rec.file_token = token
            rec.policy_file = ""
        elif isinstance(token, Reason):
            path, rec.policy_file = rec.policy_file, ""
            rec.token_problem = token
            problem = Problem(path, token)
            self.problems.append(problem)
            self._fatal.append(problem)

    # ------------------------------------------------------------------ snapshot
    def _snapshot(self) -> FleetSnapshot | None:
        """The persistent snapshot of this fleet's verified results, when the cache is on.

        Only for the first check of a fleet as its files describe it: once a refresh has
        applied facts from the hosts (``_generation``), every check is made anew.
        """
        if (not self._caching() or not self.path
                or self.spec is None or self._generation):
            return None
        if self._snap is None:
            from console.adapters.cache import FleetSnapshot

            self._snap = FleetSnapshot(self.path)
        return self._snap

    def _snapshot_key(self) -> str:
        """SHA-256 over every input a verdict of the start-up check depends on, byte for byte
        (the policy memory is added by ``_with_memory``): escort's core code, the fleet's
        CRL rule and policy names, every file of both trust directories (CA certificates,
        CRLs), every host entry and its certificate file, every VM entry and its token."""
        from console.adapters.cache import code_digest, digest_parts

        spec = self.spec
        assert spec is not None
        parts: list[bytes | str] = [code_digest(),
                                    repr((spec.missing_crl, sorted(spec.policy_names.items())))]
        for directory in (spec.trust_dir, spec.owners_trust_dir):
            parts.append(directory)
            try:
                entries = sorted(e for e in Path(directory).iterdir() if not e.name.startswith("."))
            except OSError as exc:
                parts.append(f"?{exc}")
                continue
            for e in entries:
                parts.append(e.name)
                try:
                    parts.append(e.read_bytes() if e.is_file() else b"?not a file")
                except OSError as exc:
                    parts.append(f"?{exc}")
        for h in spec.hosts:
            parts.append(repr(h))
            if h.cert_file:
                try:
                    parts.append(read_limited(h.cert_file, what="certificate"))
                except InputError as exc:
                    parts.append(f"?{exc}")
        # every VM's entry: one repr (C speed, unambiguous quoting) over the small fields, then
        # each token as a part of its own (a repr of 10,000 tokens, or one string of them all,
        # would copy 15 MB into fresh memory two or three times: ~0.1 s)
        inputs = self._vm_inputs()
        parts.append(repr([(u, n, h, p) for u, n, h, _, p in inputs]))
        parts.extend(t for _, _, _, t, _ in inputs)
        return digest_parts(parts)

    def _vm_inputs(self) -> list[tuple[str, str, str, str, Reason | None]]:
        """Every VM's entry and policy as the snapshot key covers them (and a snapshot stores
        them: a snapshot found under a key holds exactly the tokens the key was made of)."""
        return [(r.uuid, r.name, r.host, r.token, r.token_problem) for r in self._vms.values()]

    @staticmethod
    def _with_memory(key: str, memory: bytes) -> str:
        from console.adapters.cache import digest_parts

        return digest_parts((key, memory))

    def _capture(self, at: dt.datetime, state: tuple[Any, ...], inputs: list[Any], start: float,
                 budget_s: float) -> Generator[list[VMView], None, tuple[dict[str, Any], dict[str, Any]]]:
        """Everything the start-up check decided (``state``, taken when its last verdict was
        yielded: ``_check_in_steps``), for ``FleetSnapshot.dump_split``: first what the rows
        show (and the matrix), then the rest (``_complete_restore``). In steps of about
        ``budget_s`` (each yields ``[]``).

        Per VM: its entry and token exactly as the key covers them (``inputs``, from
        ``_vm_inputs``: a reuse takes the tokens from here instead of reading every policy
        file again), what its row shows, and its full check (``VMCheck``), pickled with the
        next VMs' in a group of ``CHECK_GROUP`` (one pickle each: owners, requirements and
        classes stored once per group, ~3x less CPU than one pickle per VM), so that a reuse
        unpickles only the groups of the checks it is asked about (``_adopt_lazy``; every VM
        of a group names the group's bytes). The host checks are pickled on their own too
        (``_restore_hosts``)."""
        from console.adapters.cache import FleetSnapshot

        decided, matrix, instants, problems, hosts = state
        # in the fleet's order (the check decides from both ends): a group holds neighbours
        position = {entry[0]: i for i, entry in enumerate(inputs)}
        decided = sorted(decided, key=lambda made: position.get(made[0].uuid, -1))
        clock = time.perf_counter
        vms: dict[str, tuple[str, str, tuple[Reason, ...], int, int]] = {}
        blobs: list[bytes] = []
        size = 0
        for i in range(0, len(decided), CHECK_GROUP):
            group = decided[i:i + CHECK_GROUP]
            blob = FleetSnapshot.dumps(tuple(check for check, _ in group))
            blobs.append(blob)
            for check, fields in group:  # (the row's fields as decided, else as a row makes them)
                vms[check.uuid] = (*(fields if fields is not None else _row_fields(check.policy)),
                                   size, size + len(blob))
            size += len(blob)
            if clock() - start > budget_s:
                yield []
                start = clock()
        shared: dict[tuple[str, ...], tuple[str, ...]] = {}  # equal target lists stored once
        targets = {u: shared.setdefault(t, t) for u, t in matrix.targets.items()}
        first = {
            "at": at,
            "instants": tuple(sorted(instants)),
            "vms": vms,
            "matrix": replace(matrix, targets=targets),
            "problems": list(problems),
        }
        rest: dict[str, object] = {
            "inputs": inputs,
            "checks": b"".join(blobs),
            "hosts": FleetSnapshot.dumps(hosts),  # pickled on their own: rebuilt after every view
        }
        return first, rest

    def _restore(self, state: object, at: dt.datetime, *, rest_now: bool) -> bool:
        """Adopt a snapshot's results if they are the results at ``at`` (else change nothing).

        ``state`` is what ``FleetSnapshot.load_split`` returns: what the rows show and the
        matrix, adopted here, and the rest still pickled — every VM's entry and token exactly
        as the key covered them, the VMs' full checks and the host checks — adopted by
        ``_complete_restore`` after the first rows' verdicts are out (``rest_now``: at once,
        when this process read the policy files itself and they must be compared). Every
        token or check is asked for through ``_read_token`` / ``_adopt_lazy``, which complete
        the restore first, so nothing is ever decided from a mix of snapshot and files."""
        if not (isinstance(state, tuple) and len(state) == 3):
            return False
        first: object = state[0]
        blob: object = state[1]
        digest: object = state[2]
        if not (isinstance(first, dict) and isinstance(blob, memoryview) and isinstance(digest, bytes)):
            return False
        try:
            when, instants, vms, matrix, problems = (
                first["at"], first["instants"], first["vms"], first["matrix"], first["problems"])
            if not (isinstance(when, dt.datetime) and isinstance(instants, tuple)
                    and all(isinstance(t, dt.datetime) for t in instants)
                    and isinstance(vms, dict) and isinstance(matrix, Matrix)
                    and isinstance(problems, list) and all(isinstance(p, Problem) for p in problems)):
                return False
            if time_key(instants, when) != time_key(instants, at):
                return False  # an instant that matters (nbf, exp, notAfter, nextUpdate...) has passed
            if set(vms) != set(self._vms) or not set(matrix.targets) <= set(vms):
                return False
            for entry in vms.values():
                owner, summary, why, first_at, end = entry
                if not (isinstance(owner, str) and isinstance(summary, str) and isinstance(why, tuple)
                        and all(isinstance(r, Reason) for r in why) and type(first_at) is int
                        and type(end) is int and 0 <= first_at < end):
                    return False
        except (KeyError, TypeError, ValueError):
            return False
        self._lazy_at = at
        self._restored = {u: (owner, summary, why) for u, (owner, summary, why, _, _) in vms.items()}
        self._lazy = {u: (first_at, end) for u, (_, _, _, first_at, end) in vms.items()}
        self._rest = (blob, digest)
        self._instant_set.update(instants)
        self._instants = None
        known = set(self.problems)  # those found again while reading the files (e.g. unreadable policies)
        self._snap_problems = [p for p in problems if p not in known]
        self.problems.extend(self._snap_problems)
        self._fatal.extend(p for p in self._snap_problems if p.reason.code == "policy.unreadable")
        self._matrix, self._matrix_at = matrix, at
        if rest_now:
            return self._complete_restore()
        from console.adapters.cache import FleetSnapshot

        box: list[bool] = []
        worker = threading.Thread(target=lambda: box.append(FleetSnapshot.rest_intact(blob, digest)),
                                  name="escort-snapshot-hash", daemon=True)
        worker.start()
        self._rest_hash = (worker, box)
        return True

    def _complete_restore(self) -> bool:
        """The second part of a restored snapshot (``_restore``): every policy file not read
        yet gets the snapshot's token (or the reason it could not be read) — the snapshot was
        found under a key made of these files' contents and stores exactly what that key
        covered (``_vm_inputs``) — and the checks become available. A file already read must
        hold the snapshot's token. If any of it is not what was stored, everything restored
        is dropped (False): every answer is then computed from the files. True while the
        restored snapshot stands (taken now or before)."""
        pending, self._rest = self._rest, None
        hashing, self._rest_hash = self._rest_hash, None
        if pending is None:
            return self._lazy_at is not None  # (False: dropped meanwhile)
        from console.adapters.cache import FleetSnapshot

        intact: bool | None = None
        if hashing is not None:
            hashing[0].join()
            intact = bool(hashing[1] and hashing[1][0])  # (no answer: the thread failed)
        rest = FleetSnapshot.load_rest(*pending, intact=intact)
        try:
            if not isinstance(rest, dict):
                raise TypeError("rest")
            inputs, checks, hosts = rest["inputs"], rest["checks"], rest["hosts"]
            if not (isinstance(inputs, list) and isinstance(checks, bytes) and isinstance(hosts, bytes)
                    and len(inputs) == len(self._vms)
                    and all(end <= len(checks) for _, end in self._lazy.values())):
                raise TypeError("rest")
            for rec, entry in zip(self._vms.values(), inputs, strict=True):
                uuid, name, host, token, problem = entry
                if (uuid, name, host) != (rec.uuid, rec.name, rec.host) or not isinstance(token, str):
                    raise ValueError("entry")
                if problem is not None and not isinstance(problem, Reason):
                    raise TypeError("problem")
                if not rec.policy_file and (token, problem) != (rec.token, rec.token_problem):
                    raise ValueError("read here, and not what the snapshot was made of")
        except (KeyError, TypeError, ValueError):
            self._drop_restored()
            return False
        for rec, (_, _, _, token, problem) in zip(self._vms.values(), inputs, strict=True):
            if rec.policy_file:
                rec.policy_file = ""
                rec.token = rec.file_token = token
                rec.token_problem = problem  # (its problem, if any, is among the snapshot's problems)
        self._lazy_blob = memoryview(checks)
        self._hosts_blob = hosts
        return True

    def _drop_restored(self) -> None:
        """Forget a restored snapshot's results (its second part was unusable)."""
        self._rest = self._rest_hash = None
        self._restored, self._lazy, self._lazy_at = {}, {}, None
        self._lazy_blob, self._hosts_blob = memoryview(b""), b""
        self._matrix = self._matrix_at = None
        dropped = {id(p) for p in self._snap_problems}
        self.problems = [p for p in self.problems if id(p) not in dropped]
        self._fatal = [p for p in self._fatal if id(p) not in dropped]
        self._snap_problems = []

    def _restore_hosts(self, at: dt.datetime) -> None:
        """The snapshot's host checks (after the VMs' verdicts are out). If they cannot be
        rebuilt, nothing is adopted: each host is then checked when it is asked about."""
        from console.adapters.cache import FleetSnapshot

        blob, self._hosts_blob = self._hosts_blob, b""
        hosts = FleetSnapshot.loads(blob) if blob else None
        if not isinstance(hosts, dict) or set(hosts) != set(self._hosts):
            return
        try:
            for n, entry in hosts.items():
                check, _attributes, _cert_problem = entry
                if not isinstance(check, HostCheck) or check.name != n:
                    return
        except (TypeError, ValueError):
            return
        for n, (check, attributes, cert_problem) in hosts.items():
            view = self._hosts[n]
            view.attributes, view.cert_problem, view.chain = attributes, cert_problem, check.chain
            self._chains[n] = (at, check.chain)
            self._checks[(n,)] = (at, check)
        self._views_at = at

    def _adopt_hosts(self, when: object, blob: object, extra: object, at: dt.datetime) -> None:
        """The helper's host checks (``_prefetch_main``), made at ``when`` by ``_host_check``
        as here: adopted only while they are the checks at ``at`` (``_fresh``: no instant of
        any certificate or CRL between the two), through ``_restore_hosts``. Anything
        malformed or stale adopts nothing: the hosts are then checked here."""
        from console.adapters.cache import FleetSnapshot

        try:
            if not (isinstance(when, dt.datetime) and isinstance(blob, bytes) and isinstance(extra, bytes)):
                return
            got: Any = FleetSnapshot.loads(extra)
            instants, problems, unread = got
            if not (isinstance(instants, tuple) and all(isinstance(t, dt.datetime) for t in instants)
                    and isinstance(problems, list) and all(isinstance(p, Problem) for p in problems)
                    and isinstance(unread, list) and set(unread) <= set(self._hosts)):
                return
        except Exception:  # a broken message: the host chains are checked here
            return
        self._note(instants)  # the helper read the host certificates: their instants count here too
        if not self._fresh(when, at):
            return
        self._hosts_blob = blob  # as a snapshot's host checks are adopted
        self._restore_hosts(at)
        if not all(self._checks.get((n,), (None,))[0] == at for n in self._hosts):
            return  # not adopted
        known = set(self.problems)
        self.problems.extend(p for p in problems if p not in known)
        self._cert_pending.difference_update(unread)  # read there: unreadable, reported once

    def _caching(self) -> bool:
        """The console's caches are on: asked for (``use_cache``) and not turned off by
        ``ESCORT_NO_CACHE``."""
        return self.use_cache and not os.environ.get("ESCORT_NO_CACHE")

    def _opened_cache(self) -> OpenedCache | None:
        """The persistent cache of opened policies (adapters/cache.py), when enabled."""
        if not self._caching():
            return None
        if self._cache is None:
            from console.adapters.cache import OpenedCache

            self._cache = OpenedCache()
        return self._cache

    def _view(self, rec: _VMRecord, pr: PolicyResult, allowed: tuple[str, ...]) -> VMView:
        return self._view_of(rec, _row_fields(pr), allowed)

    @staticmethod
    def _view_of(rec: _VMRecord, fields: tuple[str, str, tuple[Reason, ...]],
                 allowed: tuple[str, ...]) -> VMView:
        owner, summary, problems = fields
        return _make_view(rec.uuid, rec.name, rec.host, rec.state, rec.memory_mib, rec.vcpus, owner, summary,
                          problems, allowed, False)

    def _adopt_lazy(self, rec: _VMRecord) -> None:
        """A snapshot's check of this VM, unpickled when first asked for (``_restore``)."""
        if self._rest is not None:
            self._complete_restore()
        got = self._lazy.pop(rec.uuid, None)
        if got is None or self._lazy_at is None:
            return
        first, end = got
        from console.adapters.cache import FleetSnapshot

        group = FleetSnapshot.loads(self._lazy_blob[first:end])  # this VM's and its group's checks
        if not isinstance(group, tuple) or not all(isinstance(c, VMCheck) for c in group):
            return
        for check in group:
            other = rec if check.uuid == rec.uuid else self._vms.get(check.uuid)
            if other is None or (other is not rec and self._lazy.get(check.uuid) != got):
                continue  # (not in this group as restored, or adopted already)
            if other is not rec:
                del self._lazy[check.uuid]
            key = self._vm_key(other)  # as restored: a refresh (apply_facts) drops what is left
            self._policy_cache[other.uuid] = (self._lazy_at, other.token, check.policy)
            self._vm_checks[key] = (self._lazy_at, check)

    def policy(self, vm: str, at: dt.datetime | None = None) -> PolicyResult:
        """The VM's verified policy (UUID or name), e.g. its digest for the audit log."""
        return self._policy(self._find_vm(vm), at or self.at)

    def policy_token(self, vm: str) -> str:
        """The VM's policy token as known (fleet file or domain metadata), "" when none."""
        if self._rest is not None:
            self._complete_restore()
        return self._find_vm(vm).token

    def policies_seen(self) -> dict[str, SeenPolicy]:
        """escort's memory: the newest policy accepted per VM UUID (pushed to the host guard)."""
        self._ensure_memory()
        return dict(self._policies.seen)

    def remember_policies(self, seen: Mapping[str, SeenPolicy]) -> None:
        """Record policies accepted on another path (what the host guard is given) in the memory."""
        self._ensure_memory()
        if self._memory is None:
            return
        self._pending.update({u: p for u, p in seen.items() if self._policies.seen.get(u) != p})
        self._remember(now=True)

    def _memory_bytes(self) -> bytes:
        """The policy memory file's bytes as they are on disk now (b"" without one)."""
        return read_raw(self._memory_path) if self._memory_path else b""

    def _open_memory(self) -> None:
        """Where the remembered newest policy per VM lives; read on first need."""
        if not self.path or self.owners is None:
            return
        anchors = [n.info.fingerprint for n in self.owners.nodes() if n.anchor]
        self._memory_path = state_path(self.path, anchors)

    def _ensure_memory(self) -> None:
        """The remembered newest policy per VM (state adapter), handed to the PolicyBook."""
        if self._memory is not None or self._memory_path is None:
            return
        memory = PolicyMemory(self._memory_path)
        if memory.problem:
            self._problem(str(memory.path), "state.unreadable",
                          f"escort's memory of policies seen cannot be read: {memory.problem}; "
                          "rollbacks and owner changes are not detected until it is fixed",
                          f"move {memory.path} aside (escort then starts a new memory)")
        self._memory = memory
        self._policies.seen = memory.seen

    def _policy(self, rec: _VMRecord, at: dt.datetime) -> PolicyResult:
        if rec.policy_file:
            self._read_token(rec)
        if rec.token_problem is not None:
            return PolicyResult("", None, None, (rec.token_problem,))
        if rec.uuid in self._lazy:
            self._adopt_lazy(rec)
        hit = self._policy_cache.get(rec.uuid)
        if hit is not None and hit[1] == rec.token and self._fresh(hit[0], at):
            result = hit[2]
        else:
            self._ensure_memory()
            opened = self._policies.envelopes.open(rec.token, TYP_POLICY, POLICY_FIELDS)
            if rec.token:
                self._note_opened(opened)
            result = self._policies.verify_opened(opened, at, vm_uuid=rec.uuid)
            self._policy_cache[rec.uuid] = (at, rec.token, result)
        if rec.conflict is not None:
            return replace(result, reasons=(rec.conflict, *result.reasons))
        if self._memory is not None and result.valid:  # (else there is nothing to remember)
            seen = self._policies.seen.get(rec.uuid)
            if seen is None or seen.digest != result.digest:
                entry = result.seen_entry()
                if entry is not None:
                    self._pending[rec.uuid] = entry
        return result

    def _remember(self, *, now: bool = False) -> None:
        """Write the policies accepted since the last call to the memory (one atomic write).

        Between a start-up check's last verdict and its bookkeeping (``_after_check``, which
        writes them) a decision does not write them itself (``_remember_due``): the console's
        placement check right after the last verdict would otherwise make that write (~0.3-0.5
        s for 10,000 new policies) before the check can end for the operator. ``now``: write
        anyway (the bookkeeping; policies recorded from elsewhere)."""
        if now:
            self._remember_due = False
        if self._memory is None or not self._pending or self._remember_due:
            return
        pending, self._pending = self._pending, {}
        try:
            self._memory.record(pending)
        except OSError as exc:  # a full or read-only disk must not stop decisions
            self._problem(str(self._memory.path), "state.unwritable",
                          f"escort cannot record the policies it has seen ({exc.strerror or exc})",
                          "free space or fix permissions in the state directory", severity="warning")
            return
        self._policies.seen = self._memory.seen

    def _vm_check(self, rec: _VMRecord, at: dt.datetime, policy: PolicyResult | None = None) -> VMCheck:
        # one VM against 1,000 hosts prepares its check once, not per host; the key holds
        # everything the check is made of (a refresh replaces token, host or problem).
        # ``policy``: what ``_policy(rec, at)`` has just returned (the start-up check asks it
        # once per VM, for the row and for this)
        if rec.uuid in self._lazy:
            self._adopt_lazy(rec)
        key = self._vm_key(rec)
        cached = self._vm_checks.get(key)
        if cached is not None and self._fresh(cached[0], at):
            return cached[1]
        hit = VMCheck.prepare(rec.uuid, rec.name, rec.host,
                              policy if policy is not None else self._policy(rec, at), self.policy_names)
        if len(self._vm_checks) > 2 * max(1, len(self._vms)):
            self._vm_checks.clear()
        self._vm_checks[key] = (at, hit)
        return hit

    @staticmethod
    def _vm_key(rec: _VMRecord) -> tuple[object, ...]:
        return (rec.uuid, rec.name, rec.host, rec.token, rec.token_problem, rec.policy_file, rec.conflict)

    def _host_check(self, name: str, at: dt.datetime) -> HostCheck:
        key = (name,)
        cached = self._checks.get(key)
        hit = cached[1] if cached is not None and self._fresh(cached[0], at) else None
        if hit is None:
            self._ensure_cert(name)
            view = self._hosts[name]
            chain = view.chain = self._verify_host(name, at)  # the host's row shows this check
            problem = view.problem
            if view.cert_problem is not None and chain is None:
                problem = view.cert_problem
            hit = HostCheck.prepare(name, chain, view.attributes, reachability=view.reachability,
                                    problem=problem, policy_names=self.policy_names)
            self._checks[key] = (at, hit)
        return hit

    def _current_matrix(self, at: dt.datetime | None = None) -> Matrix:
        at = at or self.at
        if self._matrix is None or not self._fresh(self._matrix_at, at):
            vms = [self._vm_check(r, at) for r in self._vms.values()]
            hosts = [self._host_check(n, at) for n in self._hosts]
            self._matrix = allowed_matrix(vms, hosts)
            self._matrix_at = at
            self._remember()
        return self._matrix

    def _find_vm(self, key: str) -> _VMRecord:
        rec = self._vms.get(key) or self._vms.get(key.lower())
        if rec is not None:
            return rec
        if self._names is None or self._names[0] != len(self._vms):
            index: dict[str, list[_VMRecord]] = {}
            for r in self._vms.values():
                index.setdefault(r.name, []).append(r)
            self._names = (len(self._vms), index)
        named = self._names[1].get(key, [])
        if len(named) == 1:
            return named[0]
        if named:
            raise InputError(f"{len(named)} VMs are named {key!r}; use the UUID")
        down = [(n, v) for n, v in self._hosts.items() if v.reachability == "down"]
        if down:
            # Not bad input: the VM may well be on a host that did not answer.
            names = ", ".join(f"{n} ({v.problem.code})" if v.problem else n for n, v in down)
            raise ConnectionProblem(
                f"no VM {key!r} on the hosts that answered; {len(down)} of {len(self._hosts)} "
                f"host(s) could not be reached: {names} (escort hosts refresh says why)"
            )
        raise InputError(f"no VM {key!r} in fleet {self.name or self.path}")

    def _admin(self, admin: str) -> AdminRef:
        for a in self.admins:
            if a.id == admin:
                return AdminRef(a.id, a.ssh_key_fingerprint, a.cert_fingerprint)
        return AdminRef(admin)

    def grant_results(self, at: dt.datetime | None = None) -> list[GrantResult]:
        """Every grant of the fleet verified as of ``at`` (cached per token and time)."""
        self._ensure_grants()
        when = at or self.at
        cached = self._grant_cache
        if cached is not None and cached[1] == len(self._grant_tokens) and self._fresh(cached[0], when):
            return list(cached[2])
        for _, token in self._grant_tokens:
            self._note_token(token, TYP_GRANT, GRANT_FIELDS, self._grants.envelopes)
        results = [self._grants.verify(t, when, s) for s, t in self._grant_tokens]
        self._grant_cache = (when, len(self._grant_tokens), results)
        return list(results)


    def audit_ids(self, vm: str, admin: str, at: dt.datetime | None = None, *,
                  emergency: bool = False) -> tuple[str, str]:
        """(policy digest, id of the grant relied on) for the audit log; "" where none."""
        when = at or self.at
        rec = self._find_vm(vm)
        pr = self._policy(rec, when)
        used, _ = authorise(self.grant_results(when), admin=self._admin(admin), vm_uuid=rec.uuid,
                            vm_labels=pr.policy.labels if pr.policy else (),
                            policy_owner=pr.owner if pr.policy else None, emergency=emergency)
        return pr.digest, (used.grant.jti if used is not None and used.grant is not None else "")

    # ------------------------------------------------------------------ decisions
    def explain(self, vm: str, host: str, admin: str | None = None, at: dt.datetime | None = None, *,
                emergency: bool = False) -> Decision:
        """The full decision for one pair; unknown VM or host names are an InputError."""
        when = at or self.at
        rec = self._find_vm(vm)
        if host not in self._hosts:
            raise InputError(f"no host {host!r} in fleet {self.name or self.path}")
        return self._decide(rec, host, admin, when, emergency)

    def _decide(self, rec: _VMRecord, host: str, admin: str | None, at: dt.datetime,
                emergency: bool) -> Decision:
        admin_ref = self._admin(admin) if admin else None
        d = decide(self._vm_check(rec, at), self._host_check(host, at), at=at, admin=admin_ref,
                   grants=self.grant_results(at) if admin_ref else (), emergency=emergency,
                   policy_names=self.policy_names, known_cas=self._known_cas())
        if admin_ref is not None and not any(a.id == admin for a in self.admins):
            unknown = reason("grant.unknown_admin", f"admin {admin!r} is not in the fleet file's [[admins]]",
                             "add the admin (id and SSH key fingerprint) to the fleet file")
            d = replace(d, allowed=False, reasons=(unknown, *d.reasons))
        self._remember()
        return d

    def _known_cas(self) -> dict[str, str] | None:
        if self.trust is None:
            return None
        if self._known is None or self._known[0] is not self.trust:
            self._known = (self.trust, {n.info.fingerprint: n.info.name for n in self.trust.nodes()})
        return self._known[1]

    def targets(self, vm: str, admin: str | None = None, at: dt.datetime | None = None, *,
                workers: int = 1) -> list[Decision]:
        """A decision for every host of the fleet (allowed ones first, then by name).

        ``workers`` > 1 (the CLI): the hosts are split over forked helper processes, each
        deciding its share with this same service (``_decide_forked``).
        """
        when = at or self.at
        rec = self._find_vm(vm)
        hosts = list(self._hosts)
        cached = self._adopt_chains(hosts, when)
        learnt: dict[str, _ChainEntry] = {}
        if workers > 1 and len(hosts) - len(self._chain_hits) >= PARALLEL_MIN_HOSTS:
            decisions = self._decide_forked(rec, hosts, admin, when, workers, learnt)
        else:
            decisions = [self._decide(rec, h, admin, when, False) for h in hosts]
        if cached is not None:
            self._save_chains(*cached, learnt)
        return sorted(decisions, key=lambda d: (not d.allowed, d.host))

    # ---------------------------------------------------------- host chains kept between runs
    # ``escort targets --offline`` checks every host's chain (~1 ms each). A one-VM service
    # keeps each host's result in escort's cache (adapters/parsecache.py) under a SHA-256 of
    # the host's name, certificate file path and bytes, in a file whose key is a SHA-256 of
    # every file of the hosts' trust directory (CA certificates, CRLs), the CRL rule, the
    # policy names, escort's code and the crypto library's version. A result is adopted only
    # while no instant it depends on (its certificates' dates, the trust directory's
    # certificates and CRLs: ``_fresh``) lies between the time it was computed for and now.

    def _chain_store(self) -> tuple[ParsedCache, str] | None:
        if self._only_vm is None or self.eager or not self.path or self.spec is None or self.trust is None:
            return None
        import cryptography

        from console.adapters import parsecache

        store = parsecache.open_cache("chains", self.path)
        trust = parsecache.tree_parts(self.spec.trust_dir)
        if store is None or trust is None:
            return None
        return store, store.key("host chains", cryptography.__version__, self.spec.missing_crl,
                                repr(sorted(self.policy_names.items())), *trust)

    def _adopt_chains(self, hosts: list[str], at: dt.datetime
                      ) -> tuple[ParsedCache, str, dict[str, _ChainEntry]] | None:
        """Adopt the cached chain result of each host whose certificate file is byte for byte
        the one it was computed from and that is fresh at ``at``; the rest is read from the
        same bytes (a file changed meanwhile cannot be stored under the old digest)."""
        from console.adapters.cache import digest_parts

        got = self._chain_store()
        if got is None:
            return None
        store, key = got
        stored = store.load(key)
        entries = stored if type(stored) is dict else {}
        for name in hosts:
            spec = self._hosts[name].spec
            if name not in self._cert_pending:
                continue
            try:
                data = read_limited(spec.cert_file, what="certificate")
            except InputError:
                continue  # read again where the plain path reads it, and refused there
            digest = digest_parts((name, spec.cert_file, data))
            self._cert_bytes[name] = (digest, data)
            entry = _usable_chain(entries.get(digest))
            if entry is None:
                continue
            computed, instants, attributes, chain = entry
            self._note(instants)
            if self._instants is None:
                self._instants = tuple(sorted(self._instant_set))
            if time_key(self._instants, computed) != time_key(self._instants, at):
                continue  # an instant that matters lies between: checked anew
            # the result at ``computed`` is the result at ``at`` (no instant between them)
            self._cert_pending.discard(name)
            view = self._hosts[name]
            view.attributes, view.cert_problem = attributes, None
            self._chains[name] = (at, chain)
            self._chain_hits.add(name)
        return store, key, entries

    def _chain_entry(self, name: str) -> _ChainEntry | None:
        """What the cache keeps of a host chain checked in this process (None: nothing)."""
        certs, chain, view = self._host_certs.get(name), self._chains.get(name), self._hosts[name]
        if certs is None or chain is None or chain[1] is None or view.cert_problem is not None:
            return None
        instants = tuple(i for c in (certs[0], *certs[1]) for i in _cert_instants(c))
        return chain[0], instants, view.attributes, chain[1]

    def _chain_entries(self, names: Iterable[str]) -> dict[str, _ChainEntry]:
        out: dict[str, _ChainEntry] = {}
        for name in names:
            read = self._cert_bytes.get(name)
            entry = self._chain_entry(name) if read is not None and name not in self._chain_hits else None
            if read is not None and entry is not None:
                out[read[0]] = entry
        return out

    def _save_chains(self, store: ParsedCache, key: str, entries: dict[str, _ChainEntry],
                     learnt: dict[str, _ChainEntry]) -> None:
        """Store the results of this fleet's hosts: adopted ones as they were, new ones
        (this process's and its helpers') -- when anything is new."""
        new = {**learnt, **self._chain_entries(self._hosts)}
        out: dict[str, _ChainEntry] = {}
        for name in self._hosts:
            read = self._cert_bytes.get(name)
            if read is None:
                continue
            entry = entries.get(read[0]) if name in self._chain_hits else new.get(read[0])
            if entry is not None:
                out[read[0]] = entry
        if any(k not in entries for k in out):
            store.store(key, out)

    def _decide_forked(self, rec: _VMRecord, hosts: list[str], admin: str | None, at: dt.datetime,
                       workers: int, learnt: dict[str, _ChainEntry] | None = None) -> list[Decision]:
        """``[self._decide(rec, h, ...) for h in hosts]``, with the host chain checks (most of
        the time: 1,000 hosts ~1-2 s) shared with forked copies of this process.

        The first decision is made here before forking, so the VM's policy, the grants
        and the policy memory are read, checked and recorded once, by this process; a
        helper only decides, never writes. A helper that fails in any way (an unreadable
        certificate, a result that cannot be sent back) is not trusted: its share is
        decided again here, which raises the same error the plain loop would. Without
        ``os.fork`` or with other threads running (forking them is unsafe), the plain loop.
        ``learnt``: filled with the host chain results the helpers computed (for the cache).
        """
        import pickle

        first = self._decide(rec, hosts[0], admin, at, False)
        rest = hosts[1:]
        n = min(workers, os.cpu_count() or 1)
        if n <= 1 or not hasattr(os, "fork") or threading.active_count() > 1:
            return [first, *(self._decide(rec, h, admin, at, False) for h in rest)]
        # contiguous shares, this process's first: a share redone here raises the error
        # the plain loop would have raised first (host order)
        size = -(-len(rest) // n)
        shares = [rest[i * size:(i + 1) * size] for i in range(n)]
        own, theirs = shares[0], [share for share in shares[1:] if share]
        children: list[tuple[int, int, list[str]]] = []
        gc.freeze()  # the helpers' collector leaves the inherited heap alone (no copy-on-write storm)
        try:
            for share in theirs:
                read_end, write_end = os.pipe()
                try:
                    pid = os.fork()
                except OSError:  # no helper (process limits): this process decides the share
                    os.close(read_end)
                    os.close(write_end)
                    children.append((-1, -1, share))
                    continue
                if pid == 0:  # pragma: no cover - the helper (its results are checked in the parent)
                    try:  # whatever happens, the helper ends here and never runs the caller's code
                        os.close(read_end)
                        try:
                            self._memory, self._pending = None, {}
                            part = [self._decide(rec, h, admin, at, False) for h in share]
                            chains = b""
                            if learnt is not None:  # certificates do not pickle: the cache's form
                                from console.adapters.cache import FleetSnapshot

                                chains = FleetSnapshot.dumps(self._chain_entries(share))
                            data = pickle.dumps(("ok", part, chains), pickle.HIGHEST_PROTOCOL)
                        except BaseException:
                            data = pickle.dumps(("failed", None))
                        with os.fdopen(write_end, "wb") as out:
                            out.write(data)
                    finally:
                        os._exit(0)
                os.close(write_end)
                children.append((pid, read_end, share))
            decisions = [first, *(self._decide(rec, h, admin, at, False) for h in own)]
            for pid, read_end, share in list(children):
                children.remove((pid, read_end, share))
                if pid < 0:
                    decisions += [self._decide(rec, h, admin, at, False) for h in share]
                    continue
                with os.fdopen(read_end, "rb") as got:
                    data = got.read()
                os.waitpid(pid, 0)
                try:
                    sent: object = pickle.loads(data)
                except Exception:
                    sent = None
                returned = sent[1] if isinstance(sent, tuple) and len(sent) == 3 and sent[0] == "ok" else None
                if (isinstance(returned, list) and len(returned) == len(share)
                        and all(isinstance(d, Decision) and d.host == h
                                for d, h in zip(returned, share, strict=True))):
                    decisions += returned
                    if learnt is not None and isinstance(sent, tuple) and type(sent[2]) is bytes:
                        from console.adapters.cache import FleetSnapshot

                        kept = FleetSnapshot.loads(sent[2])
                        if type(kept) is dict:
                            learnt.update((k, e) for k, e in kept.items()
                                          if type(k) is str and _usable_chain(e) is not None)
                else:
                    decisions += [self._decide(rec, h, admin, at, False) for h in share]
        finally:
            gc.unfreeze()
            for pid, read_end, _ in children:  # only after an error here: reap the helpers
                if pid < 0:
                    continue
                with contextlib.suppress(OSError):
                    os.close(read_end)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        return decisions

    def matrix(self, at: dt.datetime | None = None) -> Matrix:
        """Allowed targets for every VM (the fast path), cached until facts change.

        ``at``: as of another time (`escort check` asks what breaks when something expires).
        """
        return self._current_matrix(at)

    def dependants(self, ca_fingerprint: str) -> tuple[int, int]:
        """(hosts whose chain passes through the CA, VMs whose policy trusts it)."""
        fp = ca_fingerprint.lower()
        hosts = sum(1 for h in self.hosts() if h.chain is not None and fp in h.chain.ca_fingerprints)
        at = self.at
        vms = 0
        for rec in self._vms.values():
            pol = self._policy(rec, at).policy
            if pol is not None and fp in pol.requirements.trusted_cas:
                vms += 1
        return hosts, vms

    # ------------------------------------------------------------------ refresh
    def apply_facts(self, host_name: str, facts: HostFacts | None, problem: Reason | None) -> None:
        """What a refresh learned about one host; invalidates that host's cached decisions.

        ``facts=None`` means the host could not be reached (``problem`` says why).
        Domains reported by the host replace what the fleet file said about those VMs;
        VMs previously learned from this host and no longer on it are dropped.
        """
        if self._only_vm is not None:
            raise EscortError("a service loaded for one VM (only_vm) cannot take a refresh")
        view = self._hosts.get(host_name)
        if view is None:
            raise EscortError(f"refresh reported unknown host {host_name!r}")
        if self._rest is not None:
            self._complete_restore()  # the snapshot's tokens are the files' (see _restore)
        self._checks = {k: v for k, v in self._checks.items() if k[0] != host_name}
        self._restored, self._lazy = {}, {}  # a snapshot describes the fleet files, not these facts
        self._matrix = None
        self._names = None
        self._generation += 1
        if facts is None:
            view.reachability = "down"
            view.problem = problem
            return
        view.reachability = "up"
        view.problem = problem
        view.facts = facts
        if facts.cert_pem:
            try:
                certs = pki.load_certificates(facts.cert_pem, f"{host_name}:{view.spec.remote_cert}")
                self._set_cert(host_name, certs[0], certs[1:])
            except InputError as exc:
                view.cert_problem = reason("cert.unreadable", str(exc),
                                           f"check {view.spec.remote_cert} on {host_name}")
        seen: set[str] = set()
        for dom in facts.domains:
            uuid = dom.uuid.lower()
            seen.add(uuid)
            rec = self._vms.get(uuid) or _VMRecord(uuid, dom.name, host_name)
            rec.name, rec.host, rec.state, rec.from_facts = dom.name, host_name, dom.state, True
            rec.memory_mib, rec.vcpus = dom.memory_mib or rec.memory_mib, dom.vcpus or rec.vcpus
            if rec.policy_file:  # the fleet file's policy, to compare with the domain's
                with contextlib.suppress(InputError):  # unreadable: already a problem of its own
                    self._read_token(rec)
            token = dom.policy_token
            if not token and dom.policy_xml:
                try:
                    token = token_from_metadata_xml(dom.policy_xml)
                except InputError as exc:
                    rec.token_problem = reason("policy.malformed", f"domain {dom.name}: {exc}",
                                               "re-attach the owner's policy to the domain")
            if token:
                rec.token, rec.token_problem = token, None
            self._check_conflict(rec, dom.name)
            self._vms[uuid] = rec
        for uuid, rec in list(self._vms.items()):
            if rec.host == host_name and uuid not in seen:
                if rec.from_facts and not any(v.uuid == uuid for v in (self.spec.vms if self.spec else ())):
                    del self._vms[uuid]
                else:
                    rec.state = "unknown"

    def _check_conflict(self, rec: _VMRecord, domain: str) -> None:
        """The fleet file's policy and the domain's <metadata> must agree; a conflict is shown
        (a problem, and a reason on every decision about the VM), never silently resolved."""
        source = f"{self.path}: vms {rec.name}"
        self.problems = [p for p in self.problems
                         if not (p.source == source and p.reason.code == "policy.conflict")]
        rec.conflict = None
        if not rec.file_token or rec.token == rec.file_token:
            return
        spec_file = next((v.policy_file for v in (self.spec.vms if self.spec else ()) if v.uuid == rec.uuid),
                         "the fleet file")
        rec.conflict = self._problem(
            source, "policy.conflict",
            f"VM {rec.name}: the policy in domain {domain}'s <metadata> differs from {spec_file} "
            f"named in the fleet file (sha256 {token_digest(rec.token)[:12]}… vs "
            f"{token_digest(rec.file_token)[:12]}…); escort uses neither until they agree",
            f"attach the owner's current policy to the domain (`escort policy xml`) and put the same "
            f"token in {spec_file}, or remove policy_file from the fleet file")


__all__ = ["FleetService"]
