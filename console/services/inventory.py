"""Refresh every host of a fleet concurrently, each host's failure staying on that host.

A refresh of one host: SSH connect (pooled; through the jump host), then in parallel
libvirt facts (through the forwarded socket) and the host's migration certificate
(``HostSpec.remote_cert`` over SSH, or ``HostSpec.cert_file`` for hosts without SSH).
Concurrency is bounded (default 10) so a big fleet does not trip sshd's MaxStartups
(10:30:100 by default) on a shared jump host. A failed host's connections are dropped,
so the next refresh reconnects from scratch instead of reusing a dead channel.

Results go to ``apply(host_name, facts | None, problem | None)`` (the FleetService's
``apply_facts``) as each host finishes, and are also returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from console.adapters.files import read_limited
from console.adapters.libvirt import LibvirtHost, open_host
from console.adapters.ssh import (
    CERT_UNREADABLE,
    LIBVIRT_DOWN,
    LIBVIRT_ERROR,
    READ_FAILED,
    HostProblem,
    SshPool,
    known_hosts_name,
)
from console.core.errors import EscortError, InputError
from console.core.inventory import FleetSpec, HostFacts, HostSpec
from console.core.reasons import Reason

DEFAULT_CONCURRENCY = 10
HOST_TIMEOUT_S = 90.0

ApplyFn = Callable[[str, HostFacts | None, Reason | None], object]


@dataclass(frozen=True)
class HostRefresh:
    """What one host's refresh produced: facts, a problem, or facts *and* a problem
    (libvirt answered but the certificate could not be read)."""

    name: str
    facts: HostFacts | None
    problem: Reason | None
    elapsed_s: float


def pool_for(fleet: FleetSpec, **kwargs: float) -> SshPool:
    """An SSH pool configured from the fleet file (known_hosts, ssh_config, identities)."""
    base = fleet.base_dir or "."

    def _abs(path: str) -> str | None:
        if not path:
            return None
        return path if path.startswith(("/", "~")) else f"{base}/{path}"

    return SshPool(
        known_hosts=_abs(fleet.known_hosts),
        config=_abs(fleet.ssh_config),
        identity_files=[p for p in (_abs(k) for k in fleet.identity_files) if p],
        **kwargs,  # type: ignore[arg-type]
    )


class FactsSink(Protocol):
    """What the refresh reports to: ``FleetService`` (services/fleet.py) has this shape."""

    spec: FleetSpec | None

    def apply_facts(self, host_name: str, facts: HostFacts | None, problem: Reason | None) -> None: ...


class InventoryService:
    """Concurrent, bounded refresh of a fleet's hosts; keeps one libvirt handle per host.

    Typical use: ``inv = InventoryService.for_fleet(fleet_service)`` then
    ``await inv.refresh()`` whenever the console wants fresh facts, and
    ``await inv.close()`` on the same event loop when done.
    """

    @classmethod
    def for_fleet(cls, service: FactsSink, **kwargs: Any) -> InventoryService:
        """An inventory that applies every host's result to ``service`` as it arrives."""
        if service.spec is None:
            raise EscortError("no usable fleet is loaded, so there are no hosts to refresh")
        return cls(service.spec, apply=service.apply_facts, **kwargs)

    def __init__(
        self,
        fleet: FleetSpec,
        *,
        pool: SshPool | None = None,
        apply: ApplyFn | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        host_timeout: float = HOST_TIMEOUT_S,
    ) -> None:
        if concurrency < 1:
            raise EscortError("inventory concurrency must be at least 1")
        self.fleet = fleet
        self._pool = pool
        self._apply = apply
        self._sem = asyncio.Semaphore(concurrency)
        self.concurrency = concurrency
        self.host_timeout = host_timeout
        self._hosts: dict[str, LibvirtHost] = {}
        self._host_locks: dict[str, asyncio.Lock] = {}
        self.last: dict[str, HostRefresh] = {}
        self.in_flight = 0
        self.max_in_flight = 0  # the bound, observed (tests check it)

    @property
    def pool(self) -> SshPool:
        """The SSH pool, created from the fleet file on first use (demo fleets never need it)."""
        if self._pool is None:
            self._pool = pool_for(self.fleet)
        return self._pool

    def spec(self, name: str) -> HostSpec:
        for host in self.fleet.hosts:
            if host.name == name:
                return host
        raise EscortError(f"{name}: no such host in fleet {self.fleet.name}")

    def trust_target(self, name: str) -> tuple[str, str]:
        """(ssh, jump) that reach ``name``: a fleet host, or a jump host on a fleet host's
        route, named as the fleet or ssh_config writes it (``root@10.0.0.1``, an alias) or by
        its address. The route to a jump host is the same prefix its riders use."""
        for host in self.fleet.hosts:
            if host.name == name and host.ssh:
                return host.ssh, host.jump
        for host in self.fleet.hosts:
            if not host.ssh:
                continue
            try:
                hops = self.pool.route(host.ssh, host.jump, name=host.name)
            except HostProblem:
                continue
            for i, hop in enumerate(hops[:-1]):
                if name in (hop.spec, hop.host, f"{hop.user}@{hop.host}",
                            known_hosts_name(hop.host, hop.port)):
                    return hop.spec, ",".join(h.spec for h in hops[:i]) or "none"
        if not any(host.name == name for host in self.fleet.hosts):
            raise InputError(f"{name}: no such host in fleet {self.fleet.name}, nor a jump host "
                             "on the way to one")
        raise InputError(f"{name}: the fleet reaches this host without SSH; there is no key to trust")

    async def trust_host_key(self, name: str, fingerprint: str) -> str:
        """Accept the SSH key of a fleet host or jump host, only with this fingerprint
        (:meth:`SshPool.accept_host_key`). Returns the known_hosts line added ("" if known)."""
        ssh, jump = self.trust_target(name)
        return await self.pool.accept_host_key(ssh, fingerprint, jump=jump, name=name)

    # -- refresh -------------------------------------------------------------------------
    async def refresh(self, names: Iterable[str] | None = None) -> dict[str, HostRefresh]:
        """Refresh the named hosts (default: all) concurrently; never raises for one host."""
        specs = [self.spec(n) for n in names] if names is not None else list(self.fleet.hosts)
        results = await asyncio.gather(*(self._bounded(s) for s in specs))
        return {r.name: r for r in results}

    async def _bounded(self, spec: HostSpec) -> HostRefresh:
        async with self._sem:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                result = await self.refresh_host(spec)
            finally:
                self.in_flight -= 1
        self.last[spec.name] = result
        if self._apply is not None:
            self._apply(spec.name, result.facts, result.problem)
        return result

    async def refresh_host(self, spec: HostSpec) -> HostRefresh:
        """One host: facts and certificate, or the one problem that stopped us."""
        start = time.perf_counter()
        facts: HostFacts | None = None
        problem: Reason | None = None
        try:
            facts, problem = await asyncio.wait_for(self._refresh(spec), self.host_timeout)
        except HostProblem as exc:
            problem = exc.reason()
            await self._forget(spec)
        except TimeoutError:
            problem = Reason(
                "host.timeout",
                f"{spec.name}: no answer within {self.host_timeout:.0f} s",
                "check the host and its network",
            )
            await self._forget(spec)
        except EscortError as exc:
            problem = Reason("host.error", f"{spec.name}: {_unprefixed(exc, spec.name)}")
            await self._forget(spec)
        except Exception as exc:  # one host's surprise must not end everyone's refresh
            problem = Reason(
                "host.error", f"{spec.name}: unexpected {type(exc).__name__}: {exc}".strip()
            )
            await self._forget(spec)
        return HostRefresh(spec.name, facts, problem, time.perf_counter() - start)

    async def _refresh(self, spec: HostSpec) -> tuple[HostFacts, Reason | None]:
        if spec.ssh:
            await self.pool.connect(spec.ssh, spec.jump, name=spec.name)  # fail fast, once
        facts_task = asyncio.create_task(self._facts(spec))
        cert_task = asyncio.create_task(self._cert(spec))
        try:
            facts = await facts_task
        except BaseException:
            cert_task.cancel()
            with contextlib.suppress(BaseException):
                await cert_task
            raise
        try:
            cert = await cert_task
        except HostProblem as exc:
            if exc.code != READ_FAILED:
                raise  # SSH itself failed: a host problem, not a certificate problem
            return facts, Reason(
                CERT_UNREADABLE,
                f"{spec.name}: certificate unreadable: {_unprefixed(exc, spec.name)}",
                f"check {spec.remote_cert if spec.ssh else spec.cert_file} on the host",
            )
        except EscortError as exc:
            return facts, Reason(
                CERT_UNREADABLE, f"{spec.name}: certificate unreadable: {_unprefixed(exc, spec.name)}"
            )
        return replace(facts, cert_pem=cert), None

    async def _facts(self, spec: HostSpec) -> HostFacts:
        host = await self.libvirt(spec.name)
        try:
            return await host.facts()
        except HostProblem as exc:
            if exc.code in (LIBVIRT_DOWN, LIBVIRT_ERROR):
                await self._close_libvirt(spec.name)
            raise

    async def _cert(self, spec: HostSpec) -> bytes:
        if spec.ssh and spec.remote_cert:
            return await self.pool.read_file(
                spec.ssh, spec.remote_cert, jump=spec.jump, name=spec.name
            )
        if spec.cert_file:
            path = spec.cert_file
            if not path.startswith("/") and self.fleet.base_dir:
                path = f"{self.fleet.base_dir}/{path}"
            return await asyncio.to_thread(read_limited, path, what="certificate")
        return b""

    # -- libvirt handles (also for the migration service) --------------------------------
    async def libvirt(self, name: str) -> LibvirtHost:
        """The host's live libvirt handle, (re)opened when needed."""
        spec = self.spec(name)
        lock = self._host_locks.setdefault(name, asyncio.Lock())
        async with lock:
            host = self._hosts.get(name)
            if host is not None:
                if await host.alive():
                    return host
                await self._close_libvirt(name)
            pool = self.pool if spec.ssh else None
            host = await open_host(spec, pool)
            self._hosts[name] = host
            return host

    def libvirt_cached(self, name: str) -> LibvirtHost | None:
        return self._hosts.get(name)

    async def _close_libvirt(self, name: str) -> None:
        host = self._hosts.pop(name, None)
        if host is not None:
            await host.close()

    async def _forget(self, spec: HostSpec) -> None:
        """Drop everything we hold for a failed host so the next refresh starts clean."""
        await self._close_libvirt(spec.name)
        if spec.ssh:
            with contextlib.suppress(EscortError):
                await self.pool.drop(spec.ssh, spec.jump)

    async def close(self) -> None:
        """Close libvirt handles, then SSH connections (on this, asyncssh's, loop)."""
        for name in list(self._hosts):
            await self._close_libvirt(name)
        if self._pool is not None:
            await self._pool.close()


def _unprefixed(exc: BaseException, name: str) -> str:
    """The error's text without a leading "<host>: " (the reason adds its own)."""
    return str(exc).removeprefix(f"{name}: ")


def is_live(spec: HostSpec) -> bool:
    """Whether a host entry says how to reach it (SSH, or a libvirt URI of its own).

    A host given only by its certificate file (``ssh`` empty, default URI) is checked
    offline: its placement can be explained, but there is nothing to refresh.
    """
    return bool(spec.ssh) or spec.libvirt_uri != HostSpec.libvirt_uri


async def refresh_fleet(service: FactsSink, **kwargs: Any) -> dict[str, HostRefresh]:
    """One refresh of every live host of ``service``'s fleet, connections closed afterwards.

    For one-shot commands (``escort explain``, ``escort targets``, ``escort hosts
    refresh``); the console keeps its InventoryService open instead.
    """
    inventory = InventoryService.for_fleet(service, **kwargs)
    names = [h.name for h in inventory.fleet.hosts if is_live(h)]
    if not names:
        return {}
    try:
        return await inventory.refresh(names)
    finally:
        await inventory.close()


async def trust_host_key(fleet: Any, inventory: InventoryService, host: str, fingerprint: str, *,
                         admin: str | None = None, identity: Any = None) -> str:
    """Accept ``host``'s unknown SSH key iff it has ``fingerprint`` (``escort hosts trust``).

    A changing action like any other: read-only mode refuses it, the operator first
    proves they hold the acting admin's key, and the acceptance (or the refusal) is
    written to the audit log. Returns the known_hosts line added ("" if already trusted).
    """
    from console.adapters.audit import AuditLog
    from console.services.identity import append_signed, require_admin
    from console.services.migration import default_audit_path

    fleet.require_writable("trust a host key")
    configured = fleet.spec.audit_log if fleet.spec else ""
    audit = await asyncio.to_thread(AuditLog, configured or default_audit_path())
    try:
        proof = await require_admin(fleet, "trust a host key", admin=admin, identity=identity,
                                    audit=lambda e: asyncio.to_thread(audit.append, e))
        line = await inventory.trust_host_key(host, fingerprint)
        await append_signed(audit, {"kind": "host_key", "admin": proof.admin, "proof": proof.as_json(),
                                    "host": host, "fingerprint": fingerprint, "added": bool(line)}, proof)
        return line
    finally:
        audit.close()
