"""SSH to hypervisor hosts with asyncssh: one pooled, host-key-checked connection per host.

Why a pool of our own instead of letting asyncssh (or libvirt) open connections on demand:

* known_hosts is parsed **once** (matched by the host name only, as OpenSSH) and the parsed object is
  passed to every connect. Given a path, asyncssh re-reads and re-parses the file on every
  connection (124 ms per connect with a 5,000-line file).
* Host-key checking is always on. We never pass ``known_hosts=None``; a missing file is an
  empty list, so every host is refused until its key is accepted deliberately.
* Jump hosts are resolved here with OpenSSH's rules (:meth:`SshPool.route`: the fleet's
  ``jump`` acts like ``ssh -J``, every jump host's own ssh_config block applies
  recursively, loops are refused) and opened through the pool, so 200 hosts behind one
  jump host share *one* jump connection, checked against the same known_hosts. asyncssh's
  own ``ProxyJump`` handling would open a fresh jump connection per host, check it against
  ``~/.ssh/known_hosts`` and is skipped whenever a tunnel is passed (also ``None``), which
  is why every connect here passes the tunnel explicitly.
* Client keys come from console/adapters/sshkeys.py: agent first, encrypted files skipped
  (never a passphrase prompt), and the authentication error names the file to ``ssh-add``.
* Host keys as OpenSSH checks them: a known plain key is asked for first (also when the
  host has a certificate), certificates when an ``@cert-authority`` line covers the host,
  and each certificate failure (CA unknown, principal, expiry) has its own code.
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
import stat
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.config import SSHClientConfig
from asyncssh.public_key import get_default_certificate_algs, get_default_public_key_algs

from console.adapters import sshkeys
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
JUMP_LOOP = "host.jump_loop"
HOST_CERT_CA_UNKNOWN = "host.cert_ca_unknown"
HOST_CERT_PRINCIPAL = "host.cert_principal"
HOST_CERT_EXPIRED = "host.cert_expired"
HOST_CERT_NOT_YET_VALID = "host.cert_not_yet_valid"
KEY_REVOKED = "host.key_revoked"
#: the codes of host-key refusals whose presented plain key can be accepted with ``hosts trust``
TRUSTABLE = frozenset({KEY_UNKNOWN, HOST_CERT_CA_UNKNOWN, HOST_CERT_PRINCIPAL, HOST_CERT_EXPIRED,
                       HOST_CERT_NOT_YET_VALID})
CONFIG_CACHE_S = 5.0
#: Ciphers offered first unless ssh_config names ``Ciphers`` for the host: AES-GCM runs in
#: OpenSSL in one call per packet, asyncssh's chacha20-poly1305 in four. Every libvirt RPC
#: rides on these connections (twice encrypted through a jump host): measured in the lab,
#: a refresh of two hosts took 27-35 ms of CPU with AES-GCM against 47-56 ms with chacha20
#: (110-141 ms vs 186-228 ms wall on the loaded machine). Both are OpenSSH defaults.
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
MAX_HOPS = 16  # longer ProxyJump chains are refused as loops (OpenSSH has no limit at all)
#: Host key types never asked for: RSA signed with SHA-1. OpenSSH dropped them from its
#: defaults in 8.8 ("no matching host key type found. Their offer: ssh-rsa"); asyncssh
#: 2.24.1 still offers them, so a host (or someone in the path) offering only ``ssh-rsa``
#: got a SHA-1 host signature accepted.
SHA1_HOST_KEY_ALGS = frozenset({b"ssh-rsa", b"ssh-rsa-cert-v01@openssh.com"})


class _NameKnownHosts(asyncssh.SSHKnownHosts):
    """known_hosts matched by the host's *name* only, as OpenSSH does (CheckHostIP no).

    asyncssh also matches the address the connection reached, so a key listed for
    another host's IP address vouched for any name that resolved (or was spoofed) to that
    address, even against the name's own, different key. ``@revoked`` lines found by the
    address still count (refusing more is safe).
    """

    def _add_pattern(self, pattern: str, entry: Any) -> None:
        """OpenSSH has no address ranges in known_hosts: ``10.0.0.0/8`` names no host.

        asyncssh matched it as a network (any port, too), so one line vouched for every
        address in it. Such patterns are dropped from trusting lines; an ``@revoked`` line
        keeps them (refusing more is safe). Hashed names (``|1|...``) may hold ``/``.
        """
        if entry[0] != "revoked" and not pattern.startswith("|"):
            pattern = ",".join(p for p in pattern.split(",") if "/" not in p)
            if not pattern:
                return
        super()._add_pattern(pattern, entry)

    def match(self, host: str, addr: str, port: int | None):  # type: ignore[no-untyped-def]
        result = super().match(host, "", port)
        if not addr or addr == host:
            return result
        revoked = list(result[2])
        for p in {port, None}:  # match() drops the [addr]:port revocations when it falls back
            revoked += [k for k in self._match(addr, "", p)[2] if k not in revoked]
        return (result[0], result[1], revoked, *result[3:])


class HostProblem(ConnectionProblem):
    """A host-level failure with a stable ``code``; ``str()`` is one line."""

    def __init__(self, code: str, message: str, fix: str = "") -> None:
        super().__init__(" ".join(message.split()))
        self.code = code
        self.fix = fix
        self.via_jump = False  # already says which jump host failed (not wrapped again)

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
        hop: str = "",
        hop_code: str = "",
    ) -> None:
        super().__init__(code, message, fix)
        self.key = key
        self.known_hosts_name = known_hosts_name
        self.hop = hop  # the hop (as written in the configs) whose key this is
        self.hop_code = hop_code or code  # that hop's own code (a jump failure keeps it here)

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
    """Remembers the keys a server presented when known_hosts did not trust them.

    asyncssh calls ``validate_host_public_key`` only for plain keys absent from
    known_hosts, and ``validate_host_ca_key`` for a host certificate signed by a CA that
    known_hosts does not list for this host. We still refuse (return False), but keep the
    keys so the error can show their SHA256 fingerprints and the line that would accept
    the plain key.
    """

    def __init__(self, seen: list[asyncssh.SSHKey], cas: list[asyncssh.SSHKey]) -> None:
        self._seen = seen
        self._cas = cas

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self._seen.append(key)
        return False

    def validate_host_ca_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        self._cas.append(key)
        return False


@dataclass
class _Entry:
    conn: asyncssh.SSHClientConnection
    jump_key: str | None  # pool key of the jump connection this one rides on


@dataclass(frozen=True)
class Hop:
    """One resolved hop: what was written (``spec``) and where it really goes."""

    spec: str
    host: str
    port: int
    user: str
    key_alias: str = ""  # ssh_config HostKeyAlias: the name known_hosts is searched for

    @property
    def key_host(self) -> str:
        """The name host keys and certificate principals are checked against."""
        return self.key_alias or self.host

    def __str__(self) -> str:
        return self.spec


def _split_jumps(text: str) -> list[str]:
    return [j.strip() for j in text.split(",") if j.strip()]


class SshPool:
    """Pooled asyncssh client connections, keyed by route (every hop, outermost first).

    ``config``: an OpenSSH client config file; ``None`` means ``~/.ssh/config`` when
    it exists. ``known_hosts``: a path, or ``None`` for ``~/.ssh/known_hosts``; read once
    here (call :meth:`reload_known_hosts` after editing it). ``identity_files``: key files
    offered to every hop, before the hop's own ``IdentityFile`` lines; the agent
    (``SSH_AUTH_SOCK`` or ``IdentityAgent``) is always asked first (console/adapters/sshkeys.py).
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
        agent_timeout: float = sshkeys.AGENT_TIMEOUT_S,
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
        # Missing or encrypted files are not an error here: like OpenSSH, they are skipped
        # per connection and named in the authentication error if nothing else works.
        self._client_keys = [str(Path(k).expanduser()) for k in identity_files]
        self.connect_timeout = connect_timeout
        self.login_timeout = login_timeout
        self.keepalive_interval = keepalive_interval
        self.keepalive_count_max = keepalive_count_max
        self.command_timeout = command_timeout
        self.agent_timeout = agent_timeout
        self._agents: dict[str, sshkeys.AgentSource] = {}
        self._config_cache: dict[
            tuple[str, int | None, str | None],
            tuple[tuple[tuple[float, int], ...], float, SSHClientConfig],
        ] = {}
        self._known_hosts = self._read_known_hosts()
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._local_user = getpass.getuser()
        self.connects = 0  # connections opened (tests and the benchmark read it)
        #: per connection: its SFTP client (a task starting it), or None when the host has no
        #: SFTP subsystem (then files are read with ``head -c`` over exec, as before)
        self._sftp: weakref.WeakKeyDictionary[
            asyncssh.SSHClientConnection, asyncio.Task[asyncssh.SFTPClient | None]
        ] = weakref.WeakKeyDictionary()
        self.sftp_reads = 0  # files read over SFTP (tests read it)

    # -- known_hosts ---------------------------------------------------------------
    def _read_known_hosts(self) -> asyncssh.SSHKnownHosts:
        path = Path(self.known_hosts_path)
        if not path.exists():
            return _NameKnownHosts()  # empty: every host refused, never "no checking"
        try:
            # O_NONBLOCK + a regular-file check: a FIFO (or device) at the path hung every
            # start for good (OpenSSH blocks too, until its ConnectTimeout)
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise ValueError("not a regular file")
                data = fh.read()
            known = _NameKnownHosts()
            known.load(data.decode("utf-8", errors="replace"))
            return known
        except (OSError, ValueError) as exc:
            raise HostProblem(SSH_ERROR, f"{path}: cannot read known_hosts ({exc})") from exc

    def reload_known_hosts(self) -> None:
        """Re-read known_hosts (after a key was accepted); open connections are kept."""
        self._known_hosts = self._read_known_hosts()

    def _known(self, host: str, port: int) -> tuple[list[asyncssh.SSHKey], list[asyncssh.SSHKey]]:
        """(plain host keys, @cert-authority keys) known_hosts lists for this name.

        For a non-22 port, ``[host]:port`` lines, else the port-less lines: OpenSSH also
        accepts a key found "without port identifier" (and so does asyncssh's matcher).
        """
        keys, cas, *_ = asyncssh.match_known_hosts(
            self._known_hosts, host, "", None if port == DEFAULT_PORT else port
        )
        return list(keys), list(cas)

    def _known_exact(self, host: str, port: int) -> list[asyncssh.SSHKey]:
        """Plain keys listed for exactly this name (``[host]:port`` for a non-22 port).

        Only these make a different key "CHANGED"; a port-less line that does not match
        makes it unknown, as in OpenSSH (which then offers to add ``[host]:port``).
        """
        keys, *_ = self._known_hosts._match(  # asyncssh 2.24.1 (pinned): no port fall-back
            host, "", None if port == DEFAULT_PORT else port
        )
        return list(keys)

    def _is_known(self, host: str, port: int) -> bool:
        keys, cas = self._known(host, port)
        return bool(keys or cas)

    # -- resolution ------------------------------------------------------------------
    def resolve(self, target: Target) -> tuple[str, int, str]:
        """(hostname, port, user) after ~/.ssh/config, as asyncssh will use them."""
        cfg = self._load_config(target)
        host = str(cfg.get("Hostname", target.host))
        port = target.port or int(str(cfg.get("Port", DEFAULT_PORT)))
        user = target.user or str(cfg.get("User", self._local_user))
        return host, port, user

    def _hop(self, spec: str) -> Hop:
        target = parse_target(spec)
        host, port, user = self.resolve(target)
        alias = self._load_config(target).get("HostKeyAlias")
        return Hop(spec, host, port, user, str(alias) if alias else "")

    def _load_config(self, target: Target) -> SSHClientConfig:
        """The ssh_config as it applies to ``target``; reused while the file is unchanged.

        Routes, keys and error messages ask for a hop's config several times per connect;
        parsing it each time costs milliseconds per host. An entry is reused for at most
        :data:`CONFIG_CACHE_S` and only while the config file's mtime/size are unchanged
        (an edited ``Include``d file is seen after at most that long).
        """
        stamp = tuple(_file_stamp(p) for p in self._config_paths)
        key = (target.host, target.port, target.user)
        hit = self._config_cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] == stamp and now - hit[1] < CONFIG_CACHE_S:
            return hit[2]
        config = self._parse_config(target)
        if len(self._config_cache) > 4096:
            self._config_cache.clear()
        self._config_cache[key] = (stamp, now, config)
        return config

    def _parse_config(self, target: Target) -> SSHClientConfig:
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

    def route(self, ssh: str, jump: str = "", *, name: str = "") -> list[Hop]:
        """Every hop to ``ssh``, outermost first, ending with ``ssh`` itself.

        Exactly OpenSSH's ProxyJump rules: ``jump`` (the fleet's ``jump``) acts like
        ``ssh -J jump ssh`` and replaces the destination's own ProxyJump; of a list
        ``a,b`` the last is the hop next to the destination and is reached with
        ``-J a``, so its own ProxyJump is ignored; a hop reached without such a list
        (the first of a list, or a single ProxyJump) follows its own ssh_config block
        (ProxyJump, HostName, User, Port, IdentityFile), recursively. ``none`` means no
        jump. A route that comes back to a hop it already passed is refused: OpenSSH
        refuses a host that jumps through itself ("jumphost loop via ...") and would
        recurse forever on a longer loop; escort refuses every loop.
        """
        label = name or ssh
        hops = [self._hop(ssh)]
        override = jump.strip()
        while True:
            if override:
                jumps = [] if override.lower() == "none" else _split_jumps(override)
            else:
                proxy = self._load_config(parse_target(hops[0].spec)).get("ProxyJump")
                text = str(proxy).strip() if proxy else ""
                jumps = [] if not text or text.lower() == "none" else _split_jumps(text)
            if not jumps:
                return hops
            nxt = self._hop(jumps[-1])
            if any((h.host, h.port, h.user) == (nxt.host, nxt.port, nxt.user) for h in hops) or (
                len(hops) >= MAX_HOPS
            ):
                path = " -> ".join([nxt.spec, *(h.spec for h in hops)])
                raise HostProblem(
                    JUMP_LOOP,
                    f"{label}: jumphost loop via {nxt.spec} ({path}); refused",
                    "fix the ProxyJump lines of these hosts in the SSH config (or the fleet's "
                    "jump) so that no host is reached through itself",
                )
            hops.insert(0, nxt)
            override = ",".join(jumps[:-1])

    def jump_chain(self, ssh: str, jump: str = "") -> list[str]:
        """The jump hosts (outermost first) for a destination, as written in the configs."""
        return [h.spec for h in self.route(ssh, jump)[:-1]]

    # -- connections -----------------------------------------------------------------
    async def connect(self, ssh: str, jump: str = "", *, name: str = "") -> asyncssh.SSHClientConnection:
        """The pooled connection to ``ssh`` (through ``jump``), opened if needed.

        Concurrent callers for the same destination wait for one connect; a connection
        that has closed is replaced.
        """
        self._loop = asyncio.get_running_loop()
        hops = self.route(ssh, jump, name=name)
        return await self._connect_route(hops, name or ssh)

    async def _connect_route(self, hops: list[Hop], label: str) -> asyncssh.SSHClientConnection:
        key = _route_key(hops)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)
            if entry is not None and not _is_closed(entry.conn):
                return entry.conn
            if entry is not None:
                await self._drop_key(key)
            tunnel: asyncssh.SSHClientConnection | None = None
            jump_key: str | None = None
            if len(hops) > 1:
                jump_key = _route_key(hops[:-1])
                via = hops[-2].spec
                try:
                    tunnel = await self._connect_route(hops[:-1], via)
                except HostProblem as exc:
                    if exc.code in (JUMP_FAILED, JUMP_LOOP) or exc.via_jump:
                        raise
                    message = f"{label}: jump host {via} failed: {exc}"
                    fix = exc.fix
                    if isinstance(exc, HostKeyProblem):  # keep the key: it can be accepted
                        if exc.code in TRUSTABLE and exc.key is not None:
                            fix = (f"check that fingerprint on {via}, then: escort hosts trust "
                                   f"{via} {exc.fingerprint}")
                        raise HostKeyProblem(
                            JUMP_FAILED, message, fix, key=exc.key,
                            known_hosts_name=exc.known_hosts_name, hop=exc.hop or via,
                            hop_code=exc.code,
                        ) from exc
                    # an authentication failure keeps its own code: the fix is about keys
                    code = AUTH_FAILED if exc.code == AUTH_FAILED else JUMP_FAILED
                    wrapped = HostProblem(code, message, fix)
                    wrapped.via_jump = True
                    raise wrapped from exc
            conn = await self._open(hops[-1], tunnel, label, via=hops[-2].spec if len(hops) > 1 else "")
            self._entries[key] = _Entry(conn, jump_key)
            return conn

    def _agent_for(self, cfg: SSHClientConfig) -> sshkeys.AgentSource | None:
        """The agent for a hop: ``IdentityAgent`` from its config block, else SSH_AUTH_SOCK."""
        configured = cfg.get("IdentityAgent")
        path = str(configured) if configured else os.environ.get("SSH_AUTH_SOCK", "")
        if path.lower() == "none":
            return None
        if path == "SSH_AUTH_SOCK":
            path = os.environ.get("SSH_AUTH_SOCK", "")
        path = str(Path(path).expanduser()) if path else ""
        if path not in self._agents:
            self._agents[path] = sshkeys.AgentSource(path, timeout=self.agent_timeout)
        return self._agents[path]

    async def keys_for(self, hop: Hop | str) -> sshkeys.KeySet:
        """The keys offered to one hop: agent first, then the fleet's and the hop's files."""
        spec = hop.spec if isinstance(hop, Hop) else hop
        cfg = self._load_config(parse_target(spec))
        configured = cfg.get("IdentityFile") or []
        files = [*self._client_keys, *(str(Path(str(f)).expanduser()) for f in configured)]  # type: ignore[attr-defined]
        return await sshkeys.collect_keys(
            files, self._agent_for(cfg), identities_only=bool(cfg.get("IdentitiesOnly"))
        )

    def _host_key_algs(self, hop: Hop) -> list[bytes]:
        """Which host key types to ask for, as OpenSSH orders them.

        A plain key known_hosts lists for the host is asked for first (so a host that also
        has a certificate is accepted by that key); certificates only when an
        ``@cert-authority`` line covers the host; with nothing known, the plain key, so the
        refusal and ``hosts trust`` show the fingerprint an admin can check on the host.
        """
        keys, cas = self._known(hop.key_host, hop.port)
        plain_default = _plain_host_key_algs()
        algs: list[bytes] = []
        for key in keys:
            algs.extend(a for a in key.sig_algorithms if a not in algs and a not in SHA1_HOST_KEY_ALGS)
        if cas:
            algs.extend(
                a for a in get_default_certificate_algs() if a not in algs and a not in SHA1_HOST_KEY_ALGS
            )
        algs.extend(a for a in plain_default if a not in algs)
        return algs

    async def _open(
        self,
        hop: Hop,
        tunnel: asyncssh.SSHClientConnection | None,
        label: str,
        *,
        via: str,
        plain_only: bool = False,
    ) -> asyncssh.SSHClientConnection:
        target = parse_target(hop.spec)
        seen: list[asyncssh.SSHKey] = []
        cas: list[asyncssh.SSHKey] = []
        keyset = await self.keys_for(hop)
        algs = _plain_host_key_algs() if plain_only else self._host_key_algs(hop)
        ciphers: Sequence[str] | tuple[()] = (
            () if self._load_config(target).get("Ciphers") else PREFERRED_CIPHERS
        )
        try:
            conn = await asyncssh.connect(
                target.host,
                target.port if target.port else (),
                username=target.user if target.user else (),
                config=self._config_paths,
                known_hosts=self._known_hosts,
                tunnel=tunnel,  # never (): asyncssh would open its own ProxyJump route
                client_factory=lambda: _KeyCatcher(seen, cas),
                client_keys=keyset.keypairs or None,
                agent_path=None,  # the agent's keys are already in client_keys
                ignore_encrypted=True,
                server_host_key_algs=[a.decode("ascii") for a in algs],
                encryption_algs=ciphers,  # () = what ssh_config / asyncssh choose
                connect_timeout=self.connect_timeout,
                login_timeout=self.login_timeout,
                keepalive_interval=self.keepalive_interval,
                keepalive_count_max=self.keepalive_count_max,
            )
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            problem = self._map_error(exc, hop, label, seen, cas, via, keyset)
            if problem.code in TRUSTABLE and problem.code != KEY_UNKNOWN and not plain_only:
                # OpenSSH: a certificate that fails is retried as the plain key inside it;
                # if that key is unknown too, the refusal names the certificate's problem
                # and shows the plain key's fingerprint (what `hosts trust` accepts).
                try:
                    return await self._open(hop, tunnel, label, via=via, plain_only=True)
                except HostKeyProblem as plain:
                    if plain.code == KEY_UNKNOWN and plain.key is not None:
                        problem = self._map_error(exc, hop, label, [plain.key], cas, via, keyset)
                except HostProblem:
                    pass
            raise problem from exc
        self.connects += 1
        return conn

    def _map_error(
        self,
        exc: BaseException,
        hop: Hop,
        label: str,
        seen: list[asyncssh.SSHKey],
        cas: list[asyncssh.SSHKey],
        via: str,
        keyset: sshkeys.KeySet | None = None,
    ) -> HostProblem:
        """One plain line per failure, saying what happened and what to do."""
        where = f"{label}: " if label else ""
        host, port, user = hop.host, hop.port, hop.user
        route = f" via jump host {via}" if via else ""
        text = str(exc)
        if isinstance(exc, asyncssh.KeyExchangeFailed) and (
            "compatible server host key" in text or "server host key algorithm" in text
        ):  # the host chooses; it says so in its disconnect (OpenSSH's sshd just closes)
            return HostProblem(
                SSH_ERROR,
                f"{where}no matching host key type found for {host}:{port}{route}: the host "
                "offers none escort asks for (never ssh-rsa, RSA signed with SHA-1, refused "
                "as by OpenSSH >= 8.8); refused",
                "give the host an ed25519 or ECDSA host key, or an sshd that signs RSA "
                "with rsa-sha2-256/512 (OpenSSH >= 7.2)",
            )
        if isinstance(exc, asyncssh.HostKeyNotVerifiable) or (
            isinstance(exc, asyncssh.KeyExchangeFailed) and "host key" in str(exc).lower()
        ):
            return self._host_key_problem(where, hop, seen, cas, exc)
        if isinstance(exc, asyncssh.PermissionDenied):
            reason = exc.reason or str(exc)
            notes = keyset.problems() if keyset is not None else []
            offered = len(keyset.keypairs) if keyset is not None else 0
            extra = f"; offered {offered} key(s)" + (f"; {'; '.join(notes)}" if notes else "")
            return HostProblem(
                AUTH_FAILED,
                f"{where}authentication failed as {user}@{host}:{port}{route} ({reason}){extra}",
                keyset.fix() if keyset is not None else
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
        hop: Hop,
        seen: list[asyncssh.SSHKey],
        cas: list[asyncssh.SSHKey],
        exc: BaseException,
    ) -> HostKeyProblem:
        host, port = hop.key_host, hop.port
        key = seen[-1] if seen else None
        # OpenSSH looks a HostKeyAlias up without a port; asyncssh also finds it that way
        name = hop.key_alias or known_hosts_name(host, port)
        kh = self.known_hosts_path
        text = str(exc).lower()
        trust = f"escort hosts trust {hop.spec} SHA256:<the host's plain key>"
        cert_checks = (
            ("ca key is not trusted", HOST_CERT_CA_UNKNOWN,
             "its host certificate is signed by a CA{ca} that no @cert-authority line in "
             f"{kh} lists for {name}",
             f"if you trust that CA, add '@cert-authority <host pattern> <CA public key>' to {kh}; "
             f"or accept the host's plain key ({trust})"),
            ("principal mismatch", HOST_CERT_PRINCIPAL,
             f"Certificate invalid: name is not a listed principal (the host certificate does "
             f"not name {host})",
             f"re-issue the host certificate with {host} among its principals "
             f"(ssh-keygen -s CA_KEY -h -n {host},... HOST_KEY.pub), or connect by a name it lists"),
            ("certificate expired", HOST_CERT_EXPIRED,
             "Certificate invalid: expired (its host certificate is past its validity)",
             "renew the host certificate (ssh-keygen -s CA_KEY -h -n NAMES -V +52w HOST_KEY.pub) "
             "and restart sshd"),
            ("not yet valid", HOST_CERT_NOT_YET_VALID,
             "Certificate invalid: not yet valid (check the clocks of this machine and the CA)",
             "fix the clock, or re-issue the certificate with a validity that has started"),
        )
        for needle, code, what, fix in cert_checks:
            if needle in text:
                ca = f" {cas[-1].get_fingerprint('sha256')}" if cas else ""
                plain = (f"; its plain key is {key.get_algorithm()} {key.get_fingerprint('sha256')}, "
                         f"not in {kh} either") if key is not None else ""
                return HostKeyProblem(
                    code, f"{where}host key refused for {name}: {what.format(ca=ca)}{plain}",
                    fix, key=key, known_hosts_name=name, hop=hop.spec,
                )
        if "revoked" in text:
            return HostKeyProblem(
                KEY_REVOKED,
                f"{where}host key refused for {name}: {exc} (marked @revoked in {kh})",
                "the key or its CA was revoked on purpose: ask who revoked it before changing anything",
                key=key, known_hosts_name=name, hop=hop.spec,
            )
        presented = (
            f"{key.get_algorithm()} {key.get_fingerprint('sha256')}" if key is not None
            else "a key of a type known_hosts has no entry for"
        )
        check = f"ssh-keygen -lf /etc/ssh/ssh_host_{_key_type(key)}_key.pub"
        if self._known_exact(host, DEFAULT_PORT if hop.key_alias else port):
            return HostKeyProblem(
                KEY_CHANGED,
                f"{where}host key CHANGED for {name}: it presented {presented}, which differs "
                f"from the key in {kh}; refused. If the host was really re-keyed, check the "
                f"fingerprint on its console ({check}), then delete the old "
                f"line (ssh-keygen -R '{name}' -f {kh}) and add the new one",
                f"verify the fingerprint on the host, then replace its line in {kh}",
                key=key,
                known_hosts_name=name,
                hop=hop.spec,
            )
        fp = key.get_fingerprint("sha256") if key is not None else "SHA256:..."
        return HostKeyProblem(
            KEY_UNKNOWN,
            f"{where}host key unknown for {name}: it presented {presented}, not in {kh}; "
            f"refused. To accept it deliberately, check that fingerprint on the host "
            f"({check}), then: escort hosts trust {hop.spec} {fp}",
            f"verify the fingerprint on the host, then add its line to {kh} "
            f"(escort hosts trust {hop.spec} {fp})",
            key=key,
            known_hosts_name=name,
            hop=hop.spec,
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
        """Read a small remote file: over the connection's SFTP session when the host offers
        one, else with ``head -c`` over exec (works without an SFTP subsystem).

        SFTP first because an exec starts a session and a process on the host for every
        read: measured in the lab, ~150-400 ms per read against a few ms for an SFTP read
        on the session kept open with the pooled connection. Both ways are bounded: a
        device file or a huge file gives one clear line, not a memory spike.
        """
        label = name or ssh
        data = await self._read_sftp(ssh, path, jump=jump, label=label, limit=limit)
        if data is None:
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

    async def _read_sftp(
        self, ssh: str, path: str, *, jump: str, label: str, limit: int
    ) -> bytes | None:
        """The file's first ``limit + 1`` bytes over SFTP; None: use exec instead (no SFTP
        subsystem, or the SFTP session broke — exec then reconnects like any command)."""
        conn = await self.connect(ssh, jump, name=label)
        task = self._sftp.get(conn)
        if task is None:
            task = asyncio.ensure_future(self._start_sftp(conn))
            self._sftp[conn] = task
        sftp = await asyncio.shield(task)
        if sftp is None:
            return None
        try:
            async with asyncio.timeout(self.command_timeout):
                async with sftp.open(path, "rb") as fh:
                    data = await fh.read(limit + 1)
        except asyncssh.SFTPError as exc:  # the host answered: no such file, permission...
            raise HostProblem(READ_FAILED, f"{label}: cannot read {path}: {exc.reason}") from exc
        except TimeoutError as exc:
            raise HostProblem(TIMED_OUT, f"{label}: reading {path} timed out") from exc
        except (asyncssh.Error, OSError):
            self._sftp.pop(conn, None)  # a broken session: next time start a new one
            return None
        self.sftp_reads += 1
        return data if isinstance(data, bytes) else str(data).encode()

    async def _start_sftp(self, conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient | None:
        try:
            async with asyncio.timeout(self.command_timeout):
                return await conn.start_sftp_client()
        except (asyncssh.Error, OSError, TimeoutError):
            return None

    # -- accepting a key deliberately -------------------------------------------------
    async def accept_host_key(
        self, ssh: str, fingerprint: str, *, jump: str = "", name: str = ""
    ) -> str:
        """Add the plain key ``ssh`` presents to known_hosts, only if it has ``fingerprint``.

        The operator checks the fingerprint on the host's console first and types it
        here; a key with any other fingerprint is refused, so this is never blind
        trust-on-first-use. Only *unknown* keys are added (also the plain key inside a
        host certificate that could not be verified, as OpenSSH offers): a CHANGED key
        has to be removed by hand (``ssh-keygen -R``), because silently replacing it is
        exactly what known_hosts protects against. A jump host on the way must be trusted
        first (``escort hosts trust <jump> SHA256:...``). Returns the line added ("" if
        the key was already trusted).
        """
        label = name or ssh
        try:
            await self.connect(ssh, jump, name=label)
            return ""
        except HostKeyProblem as exc:
            problem = exc
        if problem.code == JUMP_FAILED:
            raise HostProblem(
                JUMP_FAILED,
                f"{problem} (accept the jump host's key first: escort hosts trust {problem.hop} "
                f"{problem.fingerprint or 'SHA256:...'})",
                problem.fix,
            )
        if problem.code not in TRUSTABLE:
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
        try:
            key = _route_key(self.route(ssh, jump))
        except HostProblem:
            return None
        entry = self._entries.get(key)
        return entry.conn if entry is not None and not _is_closed(entry.conn) else None

    async def drop(self, ssh: str, jump: str = "") -> None:
        """Close a destination's connection so the next use reconnects (after a failure)."""
        try:
            key = _route_key(self.route(ssh, jump))
        except HostProblem:
            return
        await self._drop_key(key)

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
        for agent in self._agents.values():
            await agent.close()

    def close_threadsafe(self, timeout: float = 10.0) -> None:
        """Close from another thread: the work runs on the loop the connections live on."""
        loop = self._loop
        if loop is None or loop.is_closed() or not (self._entries or self._agents):
            self._entries.clear()
            return
        if not loop.is_running():
            loop.run_until_complete(self.close())
            return
        asyncio.run_coroutine_threadsafe(self.close(), loop).result(timeout)


def _plain_host_key_algs() -> list[bytes]:
    return [a for a in get_default_public_key_algs() if a not in SHA1_HOST_KEY_ALGS]


def _key_type(key: asyncssh.SSHKey | None) -> str:
    """The host key file's type word (``ssh_host_<type>_key.pub``) for an algorithm."""
    alg = key.get_algorithm() if key is not None else ""
    for word in ("ed25519", "ecdsa", "rsa", "ed448"):
        if word in alg:
            return word
    return "*"


def _file_stamp(path: str) -> tuple[float, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0.0, -1)
    return (st.st_mtime, st.st_size)


def _route_key(hops: Sequence[Hop]) -> str:
    return "|".join(f"{h.user}@{h.host}:{h.port}" for h in hops)


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
