"""libvirt on each host, reached through our SSH connection; every call in a worker thread.

How a remote host's libvirt is reached (the choice, and why):
    asyncssh ``forward_local_path(<private dir>/libvirt-sock, "/run/libvirt/libvirt-sock")``
    on the pooled SSH connection, then ``libvirt.open("qemu+unix:///system?socket=...")``.
    The alternatives were libvirt's own remote transports: ``qemu+ssh://`` spawns the
    ``ssh`` binary, which ignores the known_hosts we were given (and opens a second,
    separately authenticated connection per host, through the jump host again);
    ``qemu+libssh://`` honours ``known_hosts=`` but re-reads it on every open, knows
    nothing about our jump-host connection and cannot use ~/.ssh/config aliases. The
    forward keeps exactly one authenticated, known_hosts-checked SSH connection per host
    (ours, already used for the certificate), so both kinds of failure show up once, as
    the same host problem. The local socket lives in a fresh 0700 temporary directory so
    no other local user can ride on our authenticated channel.

``test:///`` URIs (the demo) and local ``qemu+unix``/``qemu:///`` URIs open directly.

libvirt-python blocks: each host gets a single-thread executor, so one host's calls are
serialized (a virConnect is not meant for concurrent use) while hosts proceed in parallel.
The migration engineer uses :class:`LibvirtHost` (``.conn`` and :meth:`LibvirtHost.call`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import shutil
import tempfile
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import asyncssh
import libvirt

from console.core.errors import EscortError
from console.core.inventory import DomainFacts, HostFacts, HostSpec
from console.core.policy import POLICY_NS, token_from_metadata_xml

from .ssh import LIBVIRT_DOWN, LIBVIRT_ERROR, HostProblem, SshPool

T = TypeVar("T")

REMOTE_SOCKET = "/run/libvirt/libvirt-sock"
CALL_TIMEOUT_S = 60.0

_STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
_STATE_PREFIX = {
    libvirt.VIR_DOMAIN_NOSTATE: "NOSTATE",
    libvirt.VIR_DOMAIN_RUNNING: "RUNNING",
    libvirt.VIR_DOMAIN_BLOCKED: "BLOCKED",
    libvirt.VIR_DOMAIN_PAUSED: "PAUSED",
    libvirt.VIR_DOMAIN_SHUTDOWN: "SHUTDOWN",
    libvirt.VIR_DOMAIN_SHUTOFF: "SHUTOFF",
    libvirt.VIR_DOMAIN_CRASHED: "CRASHED",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "PMSUSPENDED",
}


def _reason_table() -> dict[tuple[int, int], str]:
    """State reasons from libvirt's own constants (``VIR_DOMAIN_PAUSED_MIGRATION`` ->
    "migration"), so a newer libvirt's reasons are named without a code change here."""
    table: dict[tuple[int, int], str] = {}
    for state, prefix in _STATE_PREFIX.items():
        head = f"VIR_DOMAIN_{prefix}_"
        for attr in dir(libvirt):
            if attr.startswith(head) and not attr.endswith("_LAST"):
                rest = attr[len(head):]
                if state == libvirt.VIR_DOMAIN_PMSUSPENDED and rest.startswith("DISK_"):
                    continue
                value = getattr(libvirt, attr)
                if isinstance(value, int):
                    table[(state, value)] = rest.lower().replace("_", " ")
    return table


_REASONS = _reason_table()
_quiet_lock = threading.Lock()
_quiet = False


def _silence_libvirt_stderr() -> None:
    """libvirt prints every error to stderr by default; we report them ourselves, once."""
    global _quiet
    with _quiet_lock:
        if not _quiet:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _quiet = True


_silence_libvirt_stderr()  # at import: an error before the first open_host must not print either


def libvirt_message(exc: BaseException) -> str:
    """libvirt's message on one line."""
    if isinstance(exc, libvirt.libvirtError):
        text = str(exc) or exc.get_error_message() or "unknown libvirt error"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def state_name(state: int, reason: int) -> tuple[str, str]:
    """("paused", "migration") from the two integers ``virDomain.state()`` returns."""
    return _STATE_NAMES.get(state, f"state {state}"), _REASONS.get((state, reason), "")


def _decode_policy(xml: str) -> str:
    """The compact JWS inside escort's <metadata> element.

    virDomainGetMetadata returns the element with its namespace *stripped*
    (``<policy ver="1">TOKEN</policy>``; measured with libvirt 9.0, test and qemu
    drivers): the namespace was already selected by the call, so the element is put
    back into it before the trust core's decoder (which insists on the namespace) reads
    it. Malformed metadata is *not* treated as "no policy": the raw text is kept as the
    token, so the trust core refuses it with a reason the operator sees.
    """
    text = xml.strip()
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        return text
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return text
    if root.tag == "policy":
        root.tag = f"{{{POLICY_NS}}}policy"
        text = ET.tostring(root, encoding="unicode")
    try:
        return token_from_metadata_xml(text) or xml.strip()
    except EscortError:
        return xml.strip()


def read_host_facts(conn: Any) -> HostFacts:
    """Everything a refresh needs from one virConnect, in one thread hop (blocking)."""
    info = conn.getInfo()  # [model, memory MiB, cpus, mhz, nodes, sockets, cores, threads]
    try:
        free_mib = int(conn.getFreeMemory()) // (1024 * 1024)
    except libvirt.libvirtError:
        free_mib = 0
    domains = []
    for dom in conn.listAllDomains(0):
        try:
            domains.append(read_domain_facts(dom))
        except libvirt.libvirtError as exc:
            # A domain can vanish between the listing and the read (migrated away,
            # transient and shut down): it is simply no longer on this host.
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise
    domains.sort(key=lambda d: d.name)
    return HostFacts(
        hostname=conn.getHostname(),
        memory_mib=int(info[1]),
        cpus=int(info[2]),
        free_memory_mib=free_mib,
        domains=tuple(domains),
        fetched_at=dt.datetime.now(dt.UTC),
    )


def read_domain_facts(dom: Any) -> DomainFacts:
    state, reason = dom.state(0)
    info = dom.info()  # [state, maxMem KiB, memory KiB, vcpus, cpuTime]
    state_text, reason_text = state_name(state, reason)
    raw = ""
    try:
        raw = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, POLICY_NS, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            raise
    taints: tuple[str, ...] = ()
    if state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED):
        taints = _taints(dom)
    return DomainFacts(
        uuid=dom.UUIDString(),
        name=dom.name(),
        state=state_text,
        state_reason=reason_text,
        memory_mib=int(info[1]) // 1024,
        vcpus=int(info[3]),
        policy_token=_decode_policy(raw) if raw else "",
        persistent=bool(dom.isPersistent()),
        policy_xml=raw or "",
        taints=taints,
    )


def _taints(dom: Any) -> tuple[str, ...]:
    """libvirt's tainting messages for a running domain (virDomainGetMessages, libvirt >= 7.1);
    () where they are not kept (a driver that does not support the call, bindings older than
    the call, a stand-in domain in tests)."""
    messages = getattr(dom, "messages", None)
    if messages is None:
        return ()
    try:
        return tuple(str(m) for m in messages(libvirt.VIR_DOMAIN_MESSAGE_TAINTING))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_OPERATION_INVALID):
            return ()
        raise


class LibvirtHost:
    """One host's libvirt connection and the single thread that talks to it.

    ``conn`` is the raw ``virConnect`` (for the migration engine: ``migrate3``,
    ``jobStats``...). Use it only inside :meth:`call` or from this host's thread.
    """

    def __init__(
        self,
        name: str,
        conn: Any,
        executor: ThreadPoolExecutor,
        *,
        local_uri: str,
        listener: asyncssh.SSHListener | None = None,
        sock_dir: str | None = None,
    ) -> None:
        self.name = name
        self.conn = conn
        self.local_uri = local_uri  # what libvirt.open() was given (tests, debugging)
        self._executor = executor
        self._listener = listener
        self._sock_dir = sock_dir
        self._closed = False

    @property
    def thread_name_prefix(self) -> str:
        return f"libvirt-{self.name}"

    async def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = CALL_TIMEOUT_S) -> T:
        """Run a blocking libvirt call in this host's thread; libvirt errors become one line."""
        if self._closed:
            raise HostProblem(LIBVIRT_ERROR, f"{self.name}: libvirt connection is closed")
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._executor, functools.partial(fn, *args))
        try:
            return await asyncio.wait_for(fut, timeout) if timeout else await fut
        except libvirt.libvirtError as exc:
            raise _problem(self.name, exc) from exc
        except TimeoutError as exc:
            raise HostProblem(
                LIBVIRT_ERROR, f"{self.name}: libvirt did not answer within {timeout:.0f} s"
            ) from exc

    async def call_long(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a call that blocks for long (``migrate3``) in a thread of its own.

        The host's own thread stays free, so ``jobStats``/``abortJob`` on the same
        connection (libvirt connections are thread-safe) are not queued behind it.
        No timeout: a stalled migration is the migration watchdog's business.
        """
        if self._closed:
            raise HostProblem(LIBVIRT_ERROR, f"{self.name}: libvirt connection is closed")
        loop = asyncio.get_running_loop()
        one = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"libvirt-{self.name}-long")
        try:
            return await loop.run_in_executor(one, functools.partial(fn, *args))
        except libvirt.libvirtError as exc:
            raise _problem(self.name, exc) from exc
        finally:
            one.shutdown(wait=False)

    async def facts(self) -> HostFacts:
        return await self.call(read_host_facts, self.conn)

    async def alive(self) -> bool:
        try:
            return bool(await self.call(self.conn.isAlive, timeout=10))
        except HostProblem:
            return False

    async def close(self) -> None:
        """Close libvirt (in its thread), then the SSH forward, then the private socket dir."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(loop.run_in_executor(self._executor, self.conn.close), 10)
        self._executor.shutdown(wait=False)
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 5)
        if self._sock_dir:
            shutil.rmtree(self._sock_dir, ignore_errors=True)


def _problem(name: str, exc: BaseException) -> HostProblem:
    msg = libvirt_message(exc)
    code = LIBVIRT_ERROR
    if isinstance(exc, libvirt.libvirtError) and exc.get_error_code() in (
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_RPC,
    ):
        code = LIBVIRT_DOWN
    label = "libvirt down" if code == LIBVIRT_DOWN else "libvirt"
    return HostProblem(code, f"{name}: {label}: {msg}", "check that libvirtd runs on the host")


def remote_socket_path(uri: str) -> str:
    """The libvirt socket path *on the host* for its ``libvirt_uri``."""
    parts = urlsplit(uri)
    if parts.scheme not in ("qemu", "qemu+unix") or parts.path not in ("/system", ""):
        raise HostProblem(
            LIBVIRT_ERROR,
            f"{uri}: only qemu:///system (optionally ?socket=PATH) is supported over SSH",
        )
    sockets = parse_qs(parts.query).get("socket")
    return sockets[0] if sockets else REMOTE_SOCKET


async def open_host(spec: HostSpec, pool: SshPool | None = None) -> LibvirtHost:
    """Open one host's libvirt: directly for test:/// and local URIs, else through SSH."""
    _silence_libvirt_stderr()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"libvirt-{spec.name}")
    listener: asyncssh.SSHListener | None = None
    sock_dir: str | None = None
    uri = spec.libvirt_uri
    remote = ""
    try:
        if spec.ssh and not uri.startswith("test:"):
            if pool is None:
                raise HostProblem(LIBVIRT_ERROR, f"{spec.name}: no SSH pool to reach libvirt")
            remote = remote_socket_path(uri)
            conn_ssh = await pool.connect(spec.ssh, spec.jump, name=spec.name)
            sock_dir = tempfile.mkdtemp(prefix="escort-libvirt-")  # mode 0700
            local = str(Path(sock_dir) / "libvirt-sock")
            try:
                listener = await conn_ssh.forward_local_path(local, remote)
            except (asyncssh.Error, OSError) as exc:
                raise HostProblem(
                    LIBVIRT_ERROR, f"{spec.name}: cannot forward the libvirt socket: {exc}"
                ) from exc
            uri = f"qemu+unix:///system?socket={local}"
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(executor, libvirt.open, uri)
        try:
            conn = await asyncio.wait_for(fut, CALL_TIMEOUT_S)
        except libvirt.libvirtError as exc:
            where = f" at {remote}" if listener is not None else ""
            raise HostProblem(
                LIBVIRT_DOWN,
                f"{spec.name}: libvirt down: no libvirt daemon answered{where} "
                f"({libvirt_message(exc)})",
                "check that libvirtd runs on the host",
            ) from exc
        except TimeoutError as exc:
            raise HostProblem(
                LIBVIRT_DOWN, f"{spec.name}: libvirt did not answer within {CALL_TIMEOUT_S:.0f} s"
            ) from exc
        if conn is None:
            raise HostProblem(LIBVIRT_DOWN, f"{spec.name}: libvirt down: cannot open {uri}")
    except BaseException:
        executor.shutdown(wait=False)
        if listener is not None:
            listener.close()
        if sock_dir:
            shutil.rmtree(sock_dir, ignore_errors=True)
        raise
    return LibvirtHost(spec.name, conn, executor, local_uri=uri, listener=listener, sock_dir=sock_dir)
