"""SSH to hypervisor hosts with asyncssh: one pooled, host-key-checked connection per host.

Why a pool of our own instead of letting asyncssh (or libvirt) open connections on demand:

* known_hosts is parsed **once** (``asyncssh.read_known_hosts``) and the parsed object is
  passed to every connect. Given a path, asyncssh re-reads and re-parses the file on every
  connection (124 ms per connect with a 5,000-line file).
* Host-key checking is always on. We never pass ``known_hosts=None``; a missing file is an
  empty list, so every host is refused until its key is accepted deliberately.
* Jump hosts are resolved here (``HostSpec.jump`` or ``ProxyJump`` from the SSH config)
  and opened through the pool, so 200 hosts behind one jump host share *one* jump
  connection, checked against the same known_hosts. asyncssh's own ``ProxyJump`` handling
  would open a fresh jump connection per host and check it against ``~/.ssh/known_hosts``.
* Every failure becomes a one-line :class:`HostProblem` (a ``ConnectionProblem``) with a
  stable code the inventory shows on that host's row.

asyncssh objects belong to the event loop they were created on: :meth:`SshPool.close`
must run there (:meth:`SshPool.close_threadsafe` hops onto it from another thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh
from asyncssh.config import SSHClientConfig

from console.core.errors import ConnectionProblem
from console.core.reasons import Reason

DEFAULT_PORT = 22
MAX_READ_BYTES = 1024 * 1024  # certificates are a few KiB; refuse anything bigger

# Stable problem codes (shown on a host's row, in JSON output and in tests).
UNREACHABLE = "host.unreachable"
TIMED_OUT = "host.timeout"
AUTH_FAILED = "host.auth_failed"
KEY_UNKNOWN = "host.key_unknown"
KEY_CHANGED = "host.key_changed"
JUMP_FAILED = "host.jump_failed"
SSH_ERROR = "host.ssh_error"
READ_FAILED = "host.read_failed"
LIBVIRT_DOWN = "host.libvirt_down"
LIBVIRT_ERROR = "host.libvirt_error"
CERT_UNREADABLE = "host.cert_unreadable"


class HostProblem(ConnectionProblem):
    """A host-level failure with a stable ``code``; ``str()`` is one line."""

    def __init__(self, code: str, message: str, fix: str = "") -> None:
        super().__init__(" ".join(message.split()))
        self.code = code
        self.fix = fix

    def reason(self) -> Reason:
        """The same problem as a :class:`Reason` for views and JSON output."""
        return Reason(self.code, str(self), self.fix)


class HostKeyProblem(HostProblem):
    """The host presented a key known_hosts does not vouch for (unknown or changed)."""

    def __init__(
        self,
        code: str,
        message: str,
        fix: str,
        *,
        key: asyncssh.SSHKey | None,
        known_hosts_name: str,
    ) -> None:
        super().__init__(code, message, fix)
        self.key = key
        self.known_hosts_name = known_hosts_name

    @property
    def fingerprint(self) -> str:
        return self.key.get_fingerprint("sha256") if self.key is not None else ""

    def known_hosts_line(self) -> str:
        """The line that would accept this key (only ever written on an explicit request)."""
        if self.key is None:
            return ""
        return f"{self.known_hosts_name} {self.key.export_public_key('openssh').decode().strip()}"


@dataclass(frozen=True)
class Target:
    """Where to connect: an address or ~/.ssh/config alias, with optional user and port."""

    host: str
    port: int | None = None
    user: str | None = None

    def __str__(self) -> str:
        text = f"{self.user}@{self.host}" if self.user else self.host
        return f"{text}:{self.port}" if self.port else text


def parse_target(text: str) -> Target:
    """Parse ``[user@]host[:port]`` (IPv6 as ``[addr]:port``); an alias is a bare host."""
    raw = text.strip()
    if not raw or any(c.isspace() for c in raw):
        raise HostProblem(SSH_ERROR, f"{text!r}: not an SSH destination (expected [user@]host[:port])")
    user: str | None = None
    if "@" in raw:
        user, raw = raw.rsplit("@", 1)
        if not user:
            raise HostProblem(SSH_ERROR, f"{text!r}: empty user name")
    port_text = ""
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise HostProblem(SSH_ERROR, f"{text!r}: bad bracketed address")
        port_text = rest[1:]
    elif raw.count(":") == 1:
        host, port_text = raw.split(":")
    else:
        host = raw  # a plain name, or a bare IPv6 address without a port
    port: int | None = None
    if port_text:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise HostProblem(SSH_ERROR, f"{text!r}: port must be a number from 1 to 65535")
        port = int(port_text)
    if not host:
        raise HostProblem(SSH_ERROR, f"{text!r}: empty host")
    return Target(host, port, user)


def known_hosts_name(host: str, port: int) -> str:
    """The host's name as OpenSSH writes it in known_hosts."""
    return host if port == DEFAULT_PORT else f"[{host}]:{port}"


class _KeyCatcher(asyncssh.SSHClient):
    """Remembers the key a server presented when known_hosts did not trust it.

    asyncssh calls ``validate_host_public_key`` only for keys absent from known_hosts;
    we still refuse (return False), but keep the key so the error can show its SHA256
    fingerprint and the exact line that would accept it.
    """

    def __init__(self, seen: list[asyncssh.SSHKey]) -> None:
        self._seen = seen

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self._seen.append(key)
        return False


@dataclass
class _Entry:
    conn: asyncssh.SSHClientConnection
    jump_key: str | None  # pool key of the jump connection this one rides on


class SshPool:
    """Pooled asyncssh client connections, keyed by destination (and jump chain).

    ``config``: an OpenSSH client config file; ``None`` means ``~/.ssh/config`` when
    it exists. ``known_hosts``: a path, or ``None`` for ``~/.ssh/known_hosts``; read once
    here (call :meth:`reload_known_hosts` after editing it). ``identity_files``: keys to
    offer; empty means the SSH config's IdentityFile, the default keys and the agent
    (``SSH_AUTH_SOCK``).
    """

    def __init__(
        self,
        *,
        known_hosts: str | None = None,
        config: str | None = None,
        identity_files: Sequence[str] = (),
        connect_timeout: float = 10.0,
        login_timeout: float = 15.0,
        keepalive_interval: float = 15.0,
        keepalive_count_max: int = 3,
        command_timeout: float = 30.0,
    ) -> None:
        home_ssh = Path("~/.ssh").expanduser()
        self.known_hosts_path = str(Path(known_hosts).expanduser()) if known_hosts else str(
            home_ssh / "known_hosts"
        )
        if config:
            self._config_paths: list[str] = [str(Path(config).expanduser())]
            if not os.access(self._config_paths[0], os.R_OK):
                raise HostProblem(SSH_ERROR, f"{config}: SSH config file not readable")
        else:
            default = home_ssh / "config"
            self._config_paths = [str(default)] if os.access(default, os.R_OK) else []
        for key in identity_files:
            if not os.access(Path(key).expanduser(), os.R_OK):
                raise HostProblem(AUTH_FAILED, f"{key}: identity file not readable")
        self._client_keys = [str(Path(k).expanduser()) for k in identity_files]
        self.connect_timeout = connect_timeout
        self.login_timeout = login_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.command_timeout = command_timeout
        self._known_hosts = self._read_known_hosts()
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local_user = getpass.getuser()
        self.connects = 0  # connections opened (tests and the benchmark read it)

    # -- known_hosts ---------------------------------------------------------------
    def _read_known_hosts(self) -> asyncssh.SSHKnownHosts:
        path = Path(self.known_hosts_path)
        if not path.exists():
            return asyncssh.SSHKnownHosts()  # empty: every host refused, never "no checking"
        try:
            return asyncssh.read_known_hosts(str(path))
        except (OSError, ValueError) as exc:
            raise HostProblem(SSH_ERROR, f"{path}: cannot read known_hosts ({exc})") from exc

    def reload_known_hosts(self) -> None:
        """Re-read known_hosts (after a key was accepted); open connections are kept."""
        self._known_hosts = self._read_known_hosts()

    def _is_known(self, host: str, port: int) -> bool:
        keys, cas, *_ = asyncssh.match_known_hosts(
            self._known_hosts, host, "", None if port == DEFAULT_PORT else port
        )
        return bool(keys or cas)

    # -- resolution ------------------------------------------------------------------
    def resolve(self, target: Target) -> tuple[str, int, str]:
        """(hostname, port, user) after ~/.ssh/config, as asyncssh will use them."""
        cfg = self._load_config(target)
        host = str(cfg.get("Hostname", target.host))
        port = target.port or int(str(cfg.get("Port", DEFAULT_PORT)))
        user = target.user or str(cfg.get("User", self._local_user))
        return host, port, user

    def _load_config(self, target: Target) -> SSHClientConfig:
        try:
            config = SSHClientConfig.load(
                None,
                self._config_paths,
                False,
                False,
                False,
                self._local_user,
                target.user if target.user else (),
                target.host,
                target.port if target.port else (),
            )
        except (OSError, ValueError) as exc:
            raise HostProblem(SSH_ERROR, f"SSH config: {exc}") from exc
        assert isinstance(config, SSHClientConfig)
        return config

    def jump_chain(self, ssh: str, jump: str = "") -> list[str]:
        """The jump hosts (outermost first) for a destination: ``jump`` or its ProxyJump."""
        if jump:
            chain = [j.strip() for j in jump.split(",") if j.strip()]
        else:
            proxy = self._load_config(parse_target(ssh)).get("ProxyJump")
            chain = [j.strip() for j in str(proxy).split(",") if j.strip()] if proxy else []
        return [j for j in chain if j.lower() != "none"]

    # -- connections -----------------------------------------------------------------
    async def connect(self, ssh: str, jump: str = "", *, name: str = "") -> asyncssh.SSHClientConnection:
        """The pooled connection to ``ssh`` (through ``jump``), opened if needed.

        Concurrent callers for the same destination wait for one connect; a connection
        that has closed is replaced.
        """
        self._loop = asyncio.get_running_loop()
        chain = self.jump_chain(ssh, jump)
        return await self._connect_chain(ssh, chain, name or ssh)

    async def _connect_chain(
        self, ssh: str, chain: list[str], label: str
    ) -> asyncssh.SSHClientConnection:
        key = "|".join([*chain, ssh])
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)
            if entry is not None and not _is_closed(entry.conn):
                return entry.conn
            if entry is not None:
                await self._drop_key(key)
            tunnel: asyncssh.SSHClientConnection | None = None
            jump_key: str | None = None
            if chain:
                jump_key = "|".join(chain)
                try:
                    tunnel = await self._connect_chain(chain[-1], chain[:-1], chain[-1])
                except HostProblem as exc:
                    if exc.code == JUMP_FAILED:
                        raise
                    message = f"{label}: jump host {chain[-1]} failed: {exc}"
                    if isinstance(exc, HostKeyProblem):  # keep the key: it can be accepted
                        raise HostKeyProblem(
                            JUMP_FAILED, message, exc.fix, key=exc.key,
                            known_hosts_name=exc.known_hosts_name,
                        ) from exc
                    raise HostProblem(JUMP_FAILED, message, exc.fix) from exc
            conn = await self._open(ssh, tunnel, label, via=chain[-1] if chain else "")
            self._entries[key] = _Entry(conn, jump_key)
            return conn

    async def _open(
        self,
        ssh: str,
        tunnel: asyncssh.SSHClientConnection | None,
        label: str,
        *,
        via: str,
    ) -> asyncssh.SSHClientConnection:
        target = parse_target(ssh)
        seen: list[asyncssh.SSHKey] = []
        kwargs: dict[str, object] = {}
        if self._client_keys:
            kwargs["client_keys"] = self._client_keys
        try:
            conn = await asyncssh.connect(
                target.host,
                target.port if target.port else (),
                username=target.user if target.user else (),
                config=self._config_paths,
                known_hosts=self._known_hosts,
                tunnel=tunnel,
                client_factory=lambda: _KeyCatcher(seen),
                connect_timeout=self.connect_timeout,
                login_timeout=self.login_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=self.keepalive_count_max,
                **kwargs,
            )
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            raise self._map_error(exc, target, label, seen, via) from exc
        self.connects += 1
        return conn

    def _map_error(
        self,
        exc: BaseException,
        target: Target,
        label: str,
        seen: list[asyncssh.SSHKey],
        via: str,
    ) -> HostProblem:
        """One plain line per failure, saying what happened and what to do."""
        where = f"{label}: " if label else ""
        host, port, user = self.resolve(target)
        route = f" via jump host {via}" if via else ""
        if isinstance(exc, asyncssh.HostKeyNotVerifiable) or (
            isinstance(exc, asyncssh.KeyExchangeFailed) and "host key" in str(exc).lower()
        ):
            return self._host_key_problem(where, host, port, seen, exc)
        if isinstance(exc, asyncssh.PermissionDenied):
            return HostProblem(
                AUTH_FAILED,
                f"{where}authentication failed as {user}@{host}:{port} ({exc.reason or exc})",
                "check the identity file, the agent (SSH_AUTH_SOCK) and the host's authorized_keys",
            )
        if isinstance(exc, TimeoutError | asyncio.TimeoutError) or (
            isinstance(exc, asyncssh.DisconnectError) and "timeout" in str(exc).lower()
        ):
            return HostProblem(
                TIMED_OUT, f"{where}timed out connecting to {host}:{port}{route}",
                "check that the host is up and sshd answers",
            )
        if isinstance(exc, asyncssh.ChannelOpenError):
            return HostProblem(
                UNREACHABLE,
                f"{where}unreachable: {host}:{port}{route} refused the connection ({exc.reason})",
                "check that sshd runs on the host and the jump host can reach it",
            )
        if isinstance(exc, ConnectionRefusedError):
            return HostProblem(
                UNREACHABLE, f"{where}unreachable: {host}:{port}{route} refused the connection",
                "check that sshd runs on the host",
            )
        if isinstance(exc, OSError):
            text = exc.strerror or str(exc) or type(exc).__name__
            return HostProblem(UNREACHABLE, f"{where}unreachable: {host}:{port}{route}: {text}")
        if isinstance(exc, asyncssh.ConnectionLost | asyncssh.DisconnectError):
            return HostProblem(
                UNREACHABLE, f"{where}unreachable: {host}:{port}{route}: {exc.reason or exc}"
            )
        return HostProblem(SSH_ERROR, f"{where}SSH to {host}:{port}{route} failed: {exc}")

    def _host_key_problem(
        self,
        where: str,
        host: str,
        port: int,
        seen: list[asyncssh.SSHKey],
        exc: BaseException,
    ) -> HostKeyProblem:
        key = seen[-1] if seen else None
        name = known_hosts_name(host, port)
        presented = (
            f"{key.get_algorithm()} {key.get_fingerprint('sha256')}" if key is not None
            else "a key of a type known_hosts has no entry for"
        )
        kh = self.known_hosts_path
        check = f"ssh-keygen -lf /etc/ssh/ssh_host_{_key_type(key)}_key.pub"
        if self._is_known(host, port):
            return HostKeyProblem(
                KEY_CHANGED,
                f"{where}host key CHANGED for {name}: it presented {presented}, which differs "
                f"from the key in {kh}; refused. If the host was really re-keyed, check the "
                f"fingerprint on its console ({check}), then delete the old "
                f"line (ssh-keygen -R '{name}' -f {kh}) and add the new one",
                f"verify the fingerprint on the host, then replace its line in {kh}",
                key=key,
                known_hosts_name=name,
            )
        return HostKeyProblem(
            KEY_UNKNOWN,
            f"{where}host key unknown for {name}: it presented {presented}, not in {kh}; "
            f"refused. To accept it deliberately, check that fingerprint on the host "
            f"({check}) and add the host's line to {kh}",
            f"verify the fingerprint on the host, then add its line to {kh}",
            key=key,
            known_hosts_name=name,
        )

    # -- commands --------------------------------------------------------------------
    async def run(
        self, ssh: str, command: str, *, jump: str = "", name: str = "", timeout: float | None = None
    ) -> bytes:
        """Run one command; return its stdout, or raise a one-line HostProblem.

        A pooled connection can die between uses (host rebooted, sshd restarted): if the
        command fails on a *reused* connection, it is dropped and the command retried once
        on a fresh one, so a stale channel never shows as an error of a host that is up.
        """
        label = name or ssh
        for attempt in (1, 2):
            reused = self.cached(ssh, jump) is not None
            conn = await self.connect(ssh, jump, name=label)
            try:
                result = await conn.run(
                    command, encoding=None, check=False, timeout=timeout or self.command_timeout
                )
            except asyncssh.TimeoutError as exc:
                raise HostProblem(TIMED_OUT, f"{label}: command timed out: {command}") from exc
            except (asyncssh.Error, OSError) as exc:
                await self.drop(ssh, jump)
                if reused and attempt == 1:
                    continue
                raise HostProblem(SSH_ERROR, f"{label}: running {command!r} failed: {exc}") from exc
            break
        if result.exit_status != 0:
            err = _first_line(result.stderr) or f"exit status {result.exit_status}"
            raise HostProblem(READ_FAILED, f"{label}: {command!r} failed: {err}")
        out = result.stdout
        return out if isinstance(out, bytes) else (out or "").encode()

    async def read_file(
        self, ssh: str, path: str, *, jump: str = "", name: str = "", limit: int = MAX_READ_BYTES
    ) -> bytes:
        """Read a small remote file with ``head -c`` (works without an SFTP subsystem).

        Bounded: a device file or a huge file gives one clear line, not a memory spike.
        """
        label = name or ssh
        command = f"head -c {limit + 1} -- {shlex.quote(path)}"
        try:
            data = await self.run(ssh, command, jump=jump, name=label)
        except HostProblem as exc:
            if exc.code != READ_FAILED:
                raise
            msg = str(exc).split(" failed: ", 1)[-1]
            raise HostProblem(READ_FAILED, f"{label}: cannot read {path}: {msg}") from exc
        if len(data) > limit:
            raise HostProblem(READ_FAILED, f"{label}: {path} is larger than {limit // 1024} KiB")
        return data

    # -- accepting a key deliberately -------------------------------------------------
    async def accept_host_key(
        self, ssh: str, fingerprint: str, *, jump: str = "", name: str = ""
    ) -> str:
        """Add the key ``ssh`` presents to known_hosts, only if it has ``fingerprint``.

        The operator checks the fingerprint on the host's console first and types it
        here; a key with any other fingerprint is refused, so this is never blind
        trust-on-first-use. Only *unknown* keys are added: a CHANGED key has to be
        removed by hand (``ssh-keygen -R``), because silently replacing it is exactly
        what known_hosts protects against. Returns the line added ("" if the key was
        already trusted).
        """
        label = name or ssh
        try:
            await self.connect(ssh, jump, name=label)
            return ""
        except HostKeyProblem as exc:
            problem = exc
        if problem.code == JUMP_FAILED:
            raise HostProblem(JUMP_FAILED, f"{problem} (accept the jump host's key first)")
        if problem.code == KEY_CHANGED:
            raise problem
        if problem.key is None or problem.fingerprint != fingerprint.strip():
            raise HostProblem(
                KEY_UNKNOWN,
                f"{label}: the host presents {problem.fingerprint or 'no usable key'}, not "
                f"{fingerprint.strip()}; nothing was added to {self.known_hosts_path}",
            )
        line = problem.known_hosts_line()
        path = Path(self.known_hosts_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        old = path.read_bytes() if path.exists() else b""
        sep = b"" if not old or old.endswith(b"\n") else b"\n"
        with path.open("ab") as fh:
            fh.write(sep + line.encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.reload_known_hosts()
        return line

    # -- lifecycle ------------------------------------------------------------------------
    def cached(self, ssh: str, jump: str = "") -> asyncssh.SSHClientConnection | None:
        """The open pooled connection for a destination, if any (no connect)."""
        key = "|".join([*self.jump_chain(ssh, jump), ssh])
        entry = self._entries.get(key)
        return entry.conn if entry is not None and not _is_closed(entry.conn) else None

    async def drop(self, ssh: str, jump: str = "") -> None:
        """Close a destination's connection so the next use reconnects (after a failure)."""
        await self._drop_key("|".join([*self.jump_chain(ssh, jump), ssh]))

    async def _drop_key(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        entry.conn.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(entry.conn.wait_closed(), 5)
        # A jump connection that died takes its riders with it; drop those too.
        for other_key, other in list(self._entries.items()):
            if other.jump_key == key:
                await self._drop_key(other_key)

    async def close(self) -> None:
        """Close every connection (riders before their jump hosts). Run on the pool's loop."""
        for key in sorted(self._entries, key=lambda k: -k.count("|")):
            await self._drop_key(key)

    def close_threadsafe(self, timeout: float = 10.0) -> None:
        """Close from another thread: the work runs on the loop the connections live on."""
        loop = self._loop
        if loop is None or loop.is_closed() or not self._entries:
            self._entries.clear()
            return
        if not loop.is_running():
            loop.run_until_complete(self.close())
            return
        asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout)


def _key_type(key: asyncssh.SSHKey | None) -> str:
    """The host key file's type word (``ssh_host_<type>_key.pub``) for an algorithm."""
    alg = key.get_algorithm() if key is not None else ""
    for word in ("ed25519", "ecdsa", "rsa", "ed448"):
        if word in alg:
            return word
    return "*"


def _is_closed(conn: asyncssh.SSHClientConnection) -> bool:
    return conn.is_closed()


def _first_line(data: bytes | str | None) -> str:
    if not data:
        return ""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""
