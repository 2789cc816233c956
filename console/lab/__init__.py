"""``escort lab``: real hypervisor hosts in network namespaces on this machine (root).

CONTRACT (other engineers' integration tests use these names; extend, don't rename):

* ``Lab(dir=None, name="demo")``: ``up()`` -> ``UpResult``, ``down()`` -> list of
  what was stopped, ``status()`` -> list of ``HostStatus``, ``is_up()``.
* ``lab.host(name)`` -> ``LabHost`` (hosts.py): ``ns``, ``root``, ``ssh_ip``,
  ``migration_ip``, ``libvirt_uri`` (root-namespace Unix socket), pid files.
* ``lab.hypervisors`` (names), ``lab.jump`` (the jump host's ``LabHost``),
  ``lab.fleet_file``, ``lab.known_hosts``, ``lab.ssh_config``, ``lab.identity``,
  ``lab.pki_dir``, ``lab.pki`` (the in-memory ``LabPKI`` after ``up()``).
* Fault injection: ``stop_sshd/start_sshd``, ``stop_libvirtd/start_libvirtd``,
  ``start_extra_sshd/stop_extra_sshd`` (a second sshd: another port, a host certificate),
  ``cut_link/restore_link`` (the host's leg on the back/migration network),
  ``kill_qemu(host, domain)``, ``define_guest(host, name, ...)``.

Why a holder ("anchor") process per host: each host is ``ip netns exec NS unshare
--mount --uts`` running a tiny script that bind-mounts the private directories and
then sleeps; the daemons are started into its namespaces with ``nsenter``. So a test
can stop and restart one daemon without rebuilding the host's mounts.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid as uuidlib
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from console.core.errors import EscortError

from . import certs, configs, guests, netns
from .hosts import (
    CLIENT_FRONT_OCTET,
    HYPERVISORS,
    JUMP,
    JUMP_BACK_OCTET,
    JUMP_FRONT_OCTET,
    LAB_SUPERNET,
    LabHost,
    back_ip,
    check_name,
    client_link,
    front_ip,
    hypervisor,
    ns_prefix,
)
from .netns import LabError

__all__ = ["HostStatus", "Lab", "LabError", "LabHost", "NotRoot", "UpResult"]

DEFAULT_BASE = Path("/var/lib/escort-lab")
#: QEMU capability probing costs ~4.5 s per host; a cache seeded once makes it ~0.3 s.
CACHE_ENV = "ESCORT_LAB_CACHE"
DEFAULT_CACHE = Path("/var/cache/escort-lab/qemu-capabilities")
DAEMON_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
T = TypeVar("T")
LAB_ADMIN = "lab-admin"
#: (owner, label) pairs: each owner grants lab-admin the VMs their policies label so
LAB_GRANTS = (("alice", "app"), ("bob", "db"))
GRANT_DAYS = 30


class NotRoot(EscortError):
    """The lab needs root (namespaces, bridges, daemons)."""

    exit_code = 2


def require_root() -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not Path("/proc/self/ns/net").exists():
        raise NotRoot("escort lab needs root on Linux (network namespaces); run it with sudo")


@dataclass
class UpResult:
    already: bool
    seconds: float
    dir: Path
    fleet_file: Path
    guests: int = 0
    policies: bool = False
    guard: bool = False  # the escort guard is installed on every hypervisor


@dataclass
class HostStatus:
    name: str
    kind: str
    ns: str
    address: str
    anchor_pid: int | None
    sshd_pid: int | None
    libvirtd_pid: int | None
    sshd_ok: bool
    libvirtd_ok: bool
    guests: list[str] = field(default_factory=list)  # running domains
    problem: str = ""


def _parallel(fn: Callable[[T], Any], items: list[T]) -> list[Any]:
    """Run ``fn`` over ``items`` in threads; re-raise the first failure."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(fn, items))


def _reaped(cmd: tuple[str, ...] | list[str]) -> list[str]:
    """``cmd`` under reaper.py (stdlib only, so the interpreter runs isolated)."""
    return [sys.executable, "-I", "-S", str(Path(__file__).with_name("reaper.py")), *cmd]


def _quiet_libvirt() -> Any:
    import libvirt

    # libvirt-python prints every error to stderr unless a handler is set; we report
    # errors ourselves, one line each.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


def _ssh_keypair() -> tuple[bytes, bytes]:
    """An ed25519 key in OpenSSH format (private, public line)."""
    key = ed25519.Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                        serialization.PublicFormat.OpenSSH)
    return priv, pub


def ssh_fingerprint(pub_line: bytes) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class Lab:
    """One lab: a name (namespace prefix), a directory (all state), an address index."""

    def __init__(self, dir: str | os.PathLike[str] | None = None, name: str = "demo") -> None:
        self.name = check_name(name)
        self.dir = Path(dir).absolute() if dir is not None else DEFAULT_BASE / self.name
        self.prefix = ns_prefix(self.name)
        self.switch_ns = self.prefix + "sw"
        self.pki: certs.LabPKI | None = None
        self._children: list[subprocess.Popen[bytes]] = []

    # --- paths and names ------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.dir / "lab.json"

    @property
    def fleet_file(self) -> Path:
        return self.dir / "fleet.toml"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def identity(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def pki_dir(self) -> Path:
        return self.dir / "pki"

    @property
    def hypervisors(self) -> list[str]:
        return [p.name for p in HYPERVISORS]

    def _state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _write_state(self, **changes: Any) -> None:
        state = {**self._state(), **changes, "name": self.name}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(self.state_file)

    @property
    def index(self) -> int:
        idx = self._state().get("index")
        if not isinstance(idx, int):
            raise LabError(f"lab {self.name!r} in {self.dir} has not been started (no lab.json)")
        return idx

    def _hosts_for(self, index: int) -> list[LabHost]:
        out = [LabHost(JUMP, "jump", self.prefix + JUMP, self.dir / "hosts" / JUMP,
                       front_ip(index, JUMP_FRONT_OCTET), back_ip(index, JUMP_BACK_OCTET), "b-" + JUMP)]
        for plan in HYPERVISORS:
            out.append(LabHost(plan.name, "hypervisor", self.prefix + plan.name,
                               self.dir / "hosts" / plan.name, back_ip(index, plan.octet),
                               back_ip(index, plan.octet), "b-" + plan.name, plan))
        return out

    def all_hosts(self) -> list[LabHost]:
        return self._hosts_for(self.index)

    def host(self, name: str) -> LabHost:
        """Names, addresses and paths of one host (``jump`` or a hypervisor)."""
        for h in self.all_hosts():
            if h.name == name:
                return h
        hypervisor(name)  # raises the one-line "no lab host" error
        raise AssertionError("unreachable")

    @property
    def jump(self) -> LabHost:
        return self.host(JUMP)

    @property
    def client_ip(self) -> str:
        return front_ip(self.index, CLIENT_FRONT_OCTET)

    # --- up -------------------------------------------------------------------------
    def is_up(self) -> bool:
        """Every namespace exists and every daemon the lab started is alive in it."""
        state = self._state()
        if state.get("status") != "up" or not isinstance(state.get("index"), int):
            return False
        for h in self.all_hosts():
            if not netns.netns_exists(h.ns):
                return False
            pid_files = [h.anchor_pid_file, h.sshd_pid_file]
            if h.kind == "hypervisor":
                pid_files.append(h.libvirtd_pid_file)
            for pf in pid_files:
                pid = netns.read_pid(pf)
                if pid is None or not netns.pid_in_netns(pid, h.ns):
                    return False
        return netns.netns_exists(self.switch_ns)

    def up(self, *, guard: bool = True) -> UpResult:
        """Build and start the lab; a lab that is already up is left alone.

        ``guard`` (default): once the guests run, install the escort host guard on
        every hypervisor exactly as `escort hosts guard install` does (same installer,
        same bundle, libvirtd restarted so it sees the hook); ``guard=False`` leaves the
        hosts unguarded (tests of the unguarded case).
        """
        require_root()
        t0 = time.monotonic()
        if self.is_up():
            state = self._state()
            return UpResult(True, time.monotonic() - t0, self.dir, self.fleet_file,
                            policies=bool(state.get("policies")), guard=bool(state.get("guard")))
        self._teardown()  # whatever a crashed earlier run left behind
        try:
            result = self._build(t0, guard=guard)
        except BaseException:
            if not os.environ.get("ESCORT_LAB_KEEP"):
                self._teardown()
            raise
        return result

    def _choose_index(self) -> int:
        """A /24 pair no other lab on this machine uses (they all show in the root ns)."""
        used: set[int] = set()
        out = netns.ip("-4", "-o", "addr", "show", check=False).stdout
        for line in out.splitlines():
            for word in line.split():
                if word.startswith(("198.18.", "198.19.")):
                    with contextlib.suppress(ValueError, IndexError):
                        used.add(int(word.split(".")[2]))
        start = zlib.crc32(self.name.encode()) % 254
        for i in range(254):
            idx = (start + i) % 254 + 1
            if idx not in used:
                return idx
        raise LabError("no free lab address range left (198.18.1-254.0/24 all in use)")

    def _build(self, t0: float, *, guard: bool = True) -> UpResult:
        longest = self.dir / "hosts" / "rogue-1" / "run" / "libvirt" / "libvirt-sock"
        if len(str(longest).encode()) > 107:
            raise LabError(f"lab directory {self.dir} is too long for Unix socket paths "
                           "(108 bytes); use a shorter --dir")
        if self.dir.is_dir() and not self.state_file.exists() and any(self.dir.iterdir()):
            # `up` rewrites DIR/hosts, DIR/pki...: never inside someone's own folder.
            raise LabError(f"{self.dir} is not empty and not a lab directory (no lab.json); "
                           "choose an empty or new --dir")
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o755)
        shutil.rmtree(self.dir / "hosts", ignore_errors=True)
        index = self._choose_index()
        self._write_state(index=index, status="starting", started_at=time.time())
        hosts = self._hosts_for(index)
        hvs = [h for h in hosts if h.kind == "hypervisor"]
        phases: dict[str, float] = {}

        def mark(phase: str) -> None:
            phases[phase] = round(time.monotonic() - t0, 3)

        mark("cleanup")  # cumulative seconds since `up` started, per finished phase
        _ensure_user("libvirt-qemu")

        pki = certs.build(self.name, HYPERVISORS, {h.name: h.migration_ip for h in hvs})
        self.pki = pki
        certs.write_lab_files(pki, self.pki_dir)
        priv, pub = _ssh_keypair()
        _write(self.identity, priv, 0o600)
        _write(self.identity.with_suffix(".pub"), pub + b" escort-lab-console\n")

        mark("pki")
        self._build_network(index, hosts)
        mark("network")
        host_keys = {h.name: self._prepare_host(h, pub, pki) for h in hosts}
        _parallel(self._start_anchor, hosts)
        mark("hosts")

        cache = Path(os.environ.get(CACHE_ENV, str(DEFAULT_CACHE)))
        seeded = _seed_caps(cache, hvs)
        _parallel(self.start_sshd, [h.name for h in hosts])
        mark("sshd")
        if seeded:
            _parallel(self.start_libvirtd, [h.name for h in hvs])
            mark("libvirtd")
            counts = _parallel(self._start_guests, hvs)
        else:
            # Probe QEMU once on the first host, then hand its cache to the others.
            self.start_libvirtd(hvs[0].name)
            counts = [self._start_guests(hvs[0])]
            _copy_caps(hvs[0], cache)
            _seed_caps(cache, hvs[1:])
            _parallel(self.start_libvirtd, [h.name for h in hvs[1:]])
            counts += _parallel(self._start_guests, hvs[1:])
        if seeded:
            _copy_caps(hvs[0], cache)  # refresh after a libvirt/QEMU upgrade re-probed

        self._write_client_files(index, hosts, host_keys, pub)
        mark("guests")
        with_policies = any(n[1] for n in counts)
        if guard:
            self.install_guard()
            mark("guard")
        self._wait_sshd(hosts)
        mark("ready")
        self._write_state(status="up", policies=with_policies, phases=phases, guard=guard)
        return UpResult(False, time.monotonic() - t0, self.dir, self.fleet_file,
                        guests=sum(n[0] for n in counts), policies=with_policies, guard=guard)

    # --- the host guard -------------------------------------------------------------
    def install_guard(self, hosts: list[str] | None = None) -> list[dict[str, Any]]:
        """Install the escort guard on hypervisors, as `escort hosts guard install` would.

        The same plan (bundle, trust material, guard.json from the fleet file and the
        VMs now running) and the same installer (console/guard/remote.py) run inside
        each host's namespaces; only the transport differs (nsenter instead of SSH),
        which saves the lab a dozen SSH round trips through the jump host.
        """
        from console.services.fleet import FleetService
        from console.services.guard import bundle, payload, plan_for, remote_command

        service = FleetService.load(self.fleet_file)
        if service.spec is None:
            raise LabError(f"{self.fleet_file}: the lab's fleet file is unusable")
        from console.core.guard import seen_for_guard
        from console.core.policy import PolicyBook

        tokens = self._policy_tokens()
        uuids = frozenset(tokens)
        # what a refreshed escort pushes: its memory + every live policy it would accept now
        seen = seen_for_guard(PolicyBook(service.owners, seen=service.policies_seen()),
                              sorted(tokens.items()), service.at)
        b = bundle()

        def one(spec: Any) -> dict[str, Any]:
            plan = plan_for(service, spec, uuids=uuids, seen=seen)
            cmd = remote_command("install", b.digest[:16], plan.digest[:16])
            out = self._nsenter_input(self.host(spec.name), payload(plan, with_code=True), "sh", "-c", cmd)
            data = json.loads(out.strip().splitlines()[-1])
            if not data.get("ok"):
                raise LabError(f"{spec.name}: guard install failed: {data.get('problem')}")
            return dict(data, host=spec.name)

        specs = [h for h in service.spec.hosts if hosts is None or h.name in hosts]
        return _parallel(one, specs)

    def remove_guard(self, hosts: list[str] | None = None) -> None:
        """Remove the guard (what `escort hosts guard remove` does), e.g. to set up history."""
        from console.services.guard import remote_command

        for name in hosts or self.hypervisors:
            self._nsenter_input(self.host(name), b"", "sh", "-c", remote_command("remove"))

    @contextlib.contextmanager
    def guard_off(self, *hosts: str) -> Iterator[None]:
        """Without the guard on ``hosts`` for a moment, then installed again (and libvirtd
        restarted, which leaves guests alone): how a VM that its policy refuses comes to run
        on a host — it was there before the guard, or before its policy changed."""
        names = list(hosts) or self.hypervisors
        self.remove_guard(names)
        try:
            yield
        finally:
            self.install_guard(names)

    def _policy_tokens(self) -> dict[str, str]:
        """UUID -> policy token of the lab's domains that carry an escort policy (from libvirt)."""
        from console.adapters.libvirt import _decode_policy  # what a refresh reads, exactly
        from console.core.policy import POLICY_NS

        libvirt = _quiet_libvirt()
        out: dict[str, str] = {}
        for name in self.hypervisors:
            conn = self._open(self.host(name))
            try:
                for dom in conn.listAllDomains():
                    try:
                        meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, POLICY_NS)
                    except libvirt.libvirtError:
                        continue
                    out[dom.UUIDString()] = _decode_policy(meta)
            finally:
                conn.close()
        return out

    def _nsenter_input(self, h: LabHost, data: bytes, *cmd: str) -> str:
        anchor = netns.read_pid(h.anchor_pid_file)
        if anchor is None or not netns.pid_in_netns(anchor, h.ns):
            raise LabError(f"{h.name}: the host is not running (run `escort lab up`)")
        # reaped: the guard's installer restarts libvirtd (see _nsenter)
        proc = subprocess.run(["nsenter", "-t", str(anchor), "-m", "-u", "-n", "--", *_reaped(cmd)],
                              input=data, capture_output=True, env=DAEMON_ENV, timeout=180, check=False)
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
            raise LabError(f"{h.name}: {last[-1] if last else f'exit {proc.returncode}'}")
        return proc.stdout.decode(errors="replace")

    def _build_network(self, index: int, hosts: list[LabHost]) -> None:
        sw = self.switch_ns
        netns.add_netns(sw)
        _no_ipv6(sw)
        for br in ("front", "back"):
            netns.ip("-n", sw, "link", "add", br, "type", "bridge")
            netns.ip("-n", sw, "link", "set", br, "up")
        # The one link into the root namespace: a connected /24, no default route.
        link = client_link(self.name)
        netns.ip("link", "add", link, "type", "veth", "peer", "name", "f-client", "netns", sw)
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{link}/disable_ipv6").write_text("1\n")
        netns.ip("addr", "add", f"{front_ip(index, CLIENT_FRONT_OCTET)}/24", "dev", link)
        netns.ip("link", "set", link, "up")
        netns.ip("-n", sw, "link", "set", "f-client", "master", "front", "up")
        # Lab addresses exist only inside labs. Without this route the root namespace
        # would send packets for a back network (a console set up without the jump
        # host) or for a lab that is down (a stale fleet file) to its default gateway,
        # i.e. off the machine. Connected /24s of running labs are more specific.
        netns.ip("route", "replace", "unreachable", LAB_SUPERNET)
        for h in hosts:
            netns.add_netns(h.ns)
            _no_ipv6(h.ns)
            legs = [("back0", h.switch_port, "back", h.migration_ip)]
            if h.kind == "jump":
                legs.append(("front0", "f-" + JUMP, "front", h.ssh_ip))
            for inner, outer, bridge, addr in legs:
                netns.ip("link", "add", inner, "netns", h.ns, "type", "veth", "peer", "name", outer,
                         "netns", sw)
                netns.ip("-n", h.ns, "addr", "add", f"{addr}/24", "dev", inner)
                netns.ip("-n", h.ns, "link", "set", inner, "up")
                netns.ip("-n", sw, "link", "set", outer, "master", bridge, "up")

    def _prepare_host(self, h: LabHost, console_pub: bytes, pki: certs.LabPKI) -> bytes:
        """Write a host's private directories; returns its SSH host public key line."""
        private = configs.PRIVATE_DIRS if h.kind == "hypervisor" else configs.JUMP_PRIVATE_DIRS
        for d in private:
            (h.root / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for d in ("run", "log"):
            (h.root / d).mkdir(parents=True, exist_ok=True)
        ssh_dir = h.root / "etc" / "ssh"
        moduli = Path("/etc/ssh/moduli")
        if moduli.exists():
            shutil.copyfile(moduli, ssh_dir / "moduli")
        priv, pub = _ssh_keypair()
        _write(ssh_dir / "ssh_host_ed25519_key", priv, 0o600)
        _write(ssh_dir / "ssh_host_ed25519_key.pub", pub + b"\n")
        _write(ssh_dir / "authorized_keys" / "root", console_pub + b" escort-lab-console\n")
        _write(ssh_dir / "sshd_config", configs.sshd_config(pid_file=h.sshd_pid_file).encode())
        if h.plan is not None:
            etc = h.root / "etc" / "libvirt"
            _write(etc / "libvirtd.conf", configs.libvirtd_conf(
                str(uuidlib.uuid4()), os.environ.get("ESCORT_LAB_LIBVIRT_LOG_FILTERS", "")).encode())
            _write(etc / "qemu.conf", configs.qemu_conf().encode())
            for sub in ("var/log/libvirt/qemu", "var/lib/libvirt/qemu", "run/libvirt/qemu",
                        "var/cache/libvirt/qemu/capabilities"):
                (h.root / sub).mkdir(parents=True, exist_ok=True)
            certs.install_host(pki, h.plan, h.pki_dir)
        script = configs.init_script(hostname=h.name, root=h.root, private_dirs=private,
                                     ready_file=h.root / "run" / "ready")
        _write(h.root / "init.sh", script.encode(), 0o755)
        return pub

    def _start_anchor(self, h: LabHost) -> None:
        ready = h.root / "run" / "ready"
        ready.unlink(missing_ok=True)
        with (h.log_dir / "anchor.log").open("ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", h.ns, "unshare", "--mount", "--uts", "--propagation",
                 "private", "/bin/sh", str(h.root / "init.sh")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, env=DAEMON_ENV, close_fds=True)
        self._children.append(proc)
        _write(h.anchor_pid_file, f"{proc.pid}\n".encode())
        deadline = time.monotonic() + 10
        while not ready.exists():
            if proc.poll() is not None:
                raise LabError(f"{h.name}: host setup failed (see {h.log_dir / 'anchor.log'})")
            if time.monotonic() > deadline:
                raise LabError(f"{h.name}: host setup timed out (see {h.log_dir / 'anchor.log'})")
            time.sleep(0.01)

    def _nsenter(self, h: LabHost, *cmd: str, reaped: bool = False) -> None:
        """Run ``cmd`` in the host's namespaces; ``reaped``: under reaper.py, for a command
        that starts daemons (they, and the QEMUs they start, are reaped at once when they
        exit, as systemd does on a real host; this machine's PID 1 reaps ~1.8 s late)."""
        anchor = netns.read_pid(h.anchor_pid_file)
        if anchor is None or not netns.pid_in_netns(anchor, h.ns):
            raise LabError(f"{h.name}: the host is not running (run `escort lab up`)")
        proc = subprocess.run(["nsenter", "-t", str(anchor), "-m", "-u", "-n", "--",
                               *(_reaped(cmd) if reaped else cmd)],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              env=DAEMON_ENV, timeout=60, check=False)
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()
            raise LabError(f"{h.name}: {Path(cmd[0]).name} failed: "
                           f"{last[-1] if last else f'exit {proc.returncode}'}")

    def _start_guests(self, h: LabHost) -> tuple[int, bool]:
        assert h.plan is not None and self.pki is not None
        libvirt = _quiet_libvirt()
        conn = self._open(h)
        with_policy = False
        try:
            for g in h.plan.guests:
                vm_uuid = str(uuidlib.uuid4())
                meta = guests.policy_metadata(self.pki, h.plan, g, vm_uuid)
                with_policy = with_policy or bool(meta)
                try:
                    guests.define_guest(conn, g.name, memory_mib=g.memory_mib, uuid=vm_uuid,
                                        metadata_xml=meta)
                except libvirt.libvirtError as exc:
                    raise LabError(f"{h.name}: guest {g.name} did not start: {exc}") from exc
        finally:
            conn.close()
        return len(h.plan.guests), with_policy

    def _open(self, h: LabHost, *, timeout: float = 15.0) -> Any:
        """A libvirt connection to a host's daemon over its Unix socket (waits for it)."""
        libvirt = _quiet_libvirt()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return libvirt.open(h.libvirt_uri)
            except libvirt.libvirtError as exc:
                if time.monotonic() > deadline:
                    raise LabError(f"{h.name}: libvirtd does not answer: {exc}") from exc
                time.sleep(0.05)

    def _write_client_files(self, index: int, hosts: list[LabHost], host_keys: dict[str, bytes],
                            console_pub: bytes) -> None:
        jump = hosts[0]
        lines = []
        for h in hosts:
            names = [f"{self.name}-jump", h.ssh_ip] if h.kind == "jump" else [h.name, h.ssh_ip]
            key = b" ".join(host_keys[h.name].split()[:2]).decode()
            lines.append(f"{','.join(names)} {key}")
        _write(self.known_hosts, ("\n".join(lines) + "\n").encode())
        _write(self.ssh_config, configs.ssh_config(
            lab=self.name, lab_dir=self.dir, jump_ip=jump.ssh_ip,
            hosts=[(h.name, h.ssh_ip) for h in hosts if h.kind == "hypervisor"]).encode())
        self._write_grants(console_pub)
        _write(self.fleet_file, self._fleet_toml(hosts, console_pub).encode())

    def _write_grants(self, console_pub: bytes) -> None:
        """Owners' grants for lab-admin: alice's "app" VMs and bob's "db" VMs.

        web-* and stray-1 deliberately get none, so the console shows a grant refusal
        next to allowed moves. Grants name labels, which only the owner-signed policy
        can give a VM, so the same files stay right across `lab up`s (new UUIDs).
        """
        from console.core.grants import AdminRef, build_grant_payload, sign_grant

        assert self.pki is not None
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        admin = AdminRef(LAB_ADMIN, ssh_key=ssh_fingerprint(console_pub))
        out = self.dir / "grants"
        shutil.rmtree(out, ignore_errors=True)
        for owner, label in LAB_GRANTS:
            signer = self.pki.owners[owner]
            payload = build_grant_payload(owner=owner, admin=admin, label=label,
                                          not_before=now - dt.timedelta(minutes=5),
                                          not_after=now + dt.timedelta(days=GRANT_DAYS))
            token = sign_grant(payload, signer.key, [signer.cert])
            _write(out / f"{owner}-{label}.jws", (token + "\n").encode())

    def grant_vm(self, owner: str, vm_uuid: str, vm_name: str) -> Path:
        """``owner`` grants lab-admin one VM (by UUID) for GRANT_DAYS; returns the file.

        Used by ``escort lab guest add``; the file sits with the lab's other grants
        (the fleet file's ``grants`` directory).
        """
        import tomllib

        from console.core.grants import AdminRef, build_grant_payload, sign_grant

        if self.pki is None:
            self.pki = certs.load(self.pki_dir)
        doc = tomllib.loads(self.fleet_file.read_text(encoding="utf-8"))
        fp = next(str(a["ssh_key_fingerprint"]) for a in doc["admins"] if a["id"] == LAB_ADMIN)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        signer = self.pki.owners[owner]
        payload = build_grant_payload(owner=owner, admin=AdminRef(LAB_ADMIN, ssh_key=fp), vms=[vm_uuid],
                                      not_before=now - dt.timedelta(minutes=5),
                                      not_after=now + dt.timedelta(days=GRANT_DAYS))
        path = self.dir / "grants" / f"{owner}-vm-{vm_name}.jws"
        _write(path, (sign_grant(payload, signer.key, [signer.cert]) + "\n").encode())
        return path

    def _fleet_toml(self, hosts: list[LabHost], console_pub: bytes) -> str:
        """The fleet file (field names of core/inventory.py FleetSpec/HostSpec).

        Paths are relative to the file's directory, so the lab directory can be
        copied or mounted elsewhere.
        """
        import tomli_w

        jump = next(h for h in hosts if h.kind == "jump")
        doc: dict[str, Any] = {
            "name": f"lab-{self.name}",
            "kind": "lab",
            "trust_dir": "pki/trust",
            "owners_trust_dir": "pki/owners-trust",
            "known_hosts": "known_hosts",
            "ssh_config": "ssh_config",
            "identity_files": ["id_ed25519"],
            "audit_log": "audit.log",
            "stall_timeout_s": 30.0,
            "admins": [{"id": LAB_ADMIN, "ssh_key_fingerprint": ssh_fingerprint(console_pub)}],
            "grants": ["grants"],
            "hosts": [],
        }
        for h in hosts:
            if h.plan is None:
                continue
            doc["hosts"].append({
                "name": h.name,
                "region": h.plan.region,
                "ssh": f"root@{h.ssh_ip}",
                "jump": f"root@{jump.ssh_ip}",
                "libvirt_uri": "qemu:///system",
                "cert_file": f"pki/hosts/{h.name}.pem",
                "remote_cert": "/etc/pki/qemu/server-cert.pem",
                "migration_address": h.migration_ip,
                "tls_name": h.name,
            })
        header = (f"# escort lab {self.name!r}: written by `escort lab up`; paths are relative to "
                  "this file.\n# Hypervisors are reached through the jump host only.\n")
        return header + tomli_w.dumps(doc)

    def _wait_sshd(self, hosts: list[LabHost], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for h in hosts:
            while not self._sshd_answers(h):
                if time.monotonic() > deadline:
                    raise LabError(f"{h.name}: sshd does not answer on {h.ssh_ip}:22 "
                                   f"(see {h.log_dir / 'sshd.log'})")
                time.sleep(0.05)

    # --- daemons (also the fault-injection API) -------------------------------------
    def start_sshd(self, host: str) -> None:
        h = self.host(host)
        self._nsenter(h, "/usr/sbin/sshd", "-f", "/etc/ssh/sshd_config", "-E",
                      str(h.log_dir / "sshd.log"), reaped=True)

    def stop_sshd(self, host: str) -> None:
        self._stop_pidfile(self.host(host), self.host(host).sshd_pid_file)

    def start_extra_sshd(self, host: str, port: int, *, host_certificate: bytes = b"") -> None:
        """A second sshd on ``port`` of a lab host (same host key and users as its own sshd).

        ``host_certificate``: an OpenSSH host certificate (``ssh-keygen -s CA -h ...``) of
        the host's key, presented by this sshd only. Stop it with :meth:`stop_extra_sshd`;
        ``lab down`` stops it too. Used by the SSH tests (non-22 ports, host certificates).
        """
        h = self.host(host)
        ssh_dir = h.root / "etc" / "ssh"
        pid_file = h.root / "run" / f"sshd-{port}.pid"
        text = configs.sshd_config(pid_file=pid_file).replace("Port 22\n", f"Port {port}\n")
        cert = ssh_dir / f"ssh_host_ed25519_key-cert-{port}.pub"
        cert.unlink(missing_ok=True)
        if host_certificate:
            _write(cert, host_certificate)
            text += f"HostCertificate /etc/ssh/{cert.name}\n"
        _write(ssh_dir / f"sshd_config-{port}", text.encode())
        self._stop_pidfile(h, pid_file)
        self._nsenter(h, "/usr/sbin/sshd", "-f", f"/etc/ssh/sshd_config-{port}",
                      "-E", str(h.log_dir / f"sshd-{port}.log"), reaped=True)

    def stop_extra_sshd(self, host: str, port: int) -> None:
        h = self.host(host)
        self._stop_pidfile(h, h.root / "run" / f"sshd-{port}.pid")

    def start_libvirtd(self, host: str) -> None:
        h = self.host(host)
        if h.kind != "hypervisor":
            raise LabError(f"{host}: the jump host runs no libvirtd")
        h.libvirtd_pid_file.unlink(missing_ok=True)
        # Pinned to one CPU: libvirt compares the host CPUID it reads at start-up with
        # the one in the capability cache, and CPUID differs per core (x2APIC id), so
        # an unpinned daemon re-probes QEMU (~4.5 s) whenever it lands on another core.
        # QEMU itself is not affected: libvirt gives each guest all host CPUs.
        cpu = str(min(os.sched_getaffinity(0)))
        self._nsenter(h, "taskset", "-c", cpu, "/usr/sbin/libvirtd", "--daemon",
                      "--pid-file", "/run/libvirt/libvirtd.pid",
                      "--config", "/etc/libvirt/libvirtd.conf", reaped=True)
        self._open(h).close()

    def stop_libvirtd(self, host: str) -> None:
        """Stop the daemon only; its QEMU processes keep running (as on a real host)."""
        self._stop_pidfile(self.host(host), self.host(host).libvirtd_pid_file)

    def _stop_pidfile(self, h: LabHost, pid_file: Path) -> None:
        pid = netns.read_pid(pid_file)
        if pid is not None and not netns.kill_in_ns(pid, h.ns):
            raise LabError(f"{h.name}: process {pid} did not stop")
        pid_file.unlink(missing_ok=True)

    def kill_qemu(self, host: str, domain: str) -> None:
        """SIGKILL a guest's QEMU process (a crash, as far as libvirt can tell)."""
        h = self.host(host)
        pid = netns.read_pid(h.root / "run" / "libvirt" / "qemu" / f"{domain}.pid")
        if pid is None or not netns.pid_in_netns(pid, h.ns):
            raise LabError(f"{host}: no running QEMU for domain {domain!r}")
        os.kill(pid, 9)

    def cut_link(self, host: str) -> None:
        """Pull the host's cable on the back (migration and SSH) network."""
        h = self.host(host)
        netns.ip("-n", self.switch_ns, "link", "set", h.switch_port, "down")

    def restore_link(self, host: str) -> None:
        h = self.host(host)
        netns.ip("-n", self.switch_ns, "link", "set", h.switch_port, "up")

    def open_libvirt(self, host: str) -> Any:
        """A libvirt connection (root namespace, Unix socket) — for tests and setup."""
        return self._open(self.host(host), timeout=5.0)

    def define_guest(self, host: str, name: str, *, memory_mib: int = 64, random_fill_mib: int = 0,
                     owner: str = "", start: bool = True) -> str:
        """Define (and start) one more guest on ``host``; returns its UUID.

        ``random_fill_mib`` fills that much guest RAM with random bytes (a migration
        then has real work to do); ``owner`` ("alice"/"bob") attaches a signed policy
        trusting the lab root (needs the lab's PKI from this process's ``up()``).
        """
        from .hosts import GuestPlan

        h = self.host(host)
        vm_uuid = str(uuidlib.uuid4())
        meta = ""
        if owner:
            if h.plan is None:
                raise LabError(f"{host}: the jump host runs no guests")
            if self.pki is None:
                self.pki = certs.load(self.pki_dir)
            meta = guests.policy_metadata(self.pki, h.plan, GuestPlan(name, owner), vm_uuid)
        blob = guests.blob_path(self.dir, random_fill_mib) if random_fill_mib else None
        conn = self._open(h)
        try:
            guests.define_guest(conn, name, memory_mib=memory_mib, start=start, uuid=vm_uuid,
                                metadata_xml=meta, random_blob=blob)
        finally:
            conn.close()
        return vm_uuid

    # --- status ---------------------------------------------------------------------
    def _sshd_answers(self, h: LabHost) -> bool:
        """Read sshd's banner over the lab network: from the root ns for the jump host,
        from inside the jump host for the hypervisors (the only way in)."""
        if h.kind == "jump":
            try:
                with socket.create_connection((h.ssh_ip, 22), timeout=2) as s:
                    return s.recv(8).startswith(b"SSH-")
            except OSError:
                return False
        probe = f"exec 3<>/dev/tcp/{h.ssh_ip}/22 && head -c 4 <&3"
        try:
            proc = subprocess.run(["ip", "netns", "exec", self.prefix + JUMP, "timeout", "3",
                                   "bash", "-c", probe], capture_output=True, timeout=5, check=False)
        except subprocess.TimeoutExpired:
            return False
        return proc.stdout.startswith(b"SSH-")

    @property
    def recorded_status(self) -> str:
        """What ``lab.json`` says: "up", "starting" (an ``up`` did not finish), "down", or ""."""
        value = self._state().get("status", "")
        return value if isinstance(value, str) else ""

    def status(self) -> list[HostStatus]:
        require_root()
        out: list[HostStatus] = []
        libvirt = _quiet_libvirt()
        for h in self.all_hosts():
            present = netns.netns_exists(h.ns)

            def alive(pf: Path, h: LabHost = h) -> int | None:
                pid = netns.read_pid(pf)
                return pid if pid is not None and netns.pid_in_netns(pid, h.ns) else None

            st = HostStatus(h.name, h.kind, h.ns, h.ssh_ip, alive(h.anchor_pid_file),
                            alive(h.sshd_pid_file),
                            alive(h.libvirtd_pid_file) if h.kind == "hypervisor" else None,
                            sshd_ok=present and self._sshd_answers(h), libvirtd_ok=False)
            if not present:
                st.problem = "namespace missing"
            elif h.kind == "hypervisor":
                try:
                    conn = libvirt.open(h.libvirt_uri)
                    try:
                        st.guests = sorted(d.name() for d in conn.listAllDomains(
                            libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
                        st.libvirtd_ok = True
                    finally:
                        conn.close()
                except libvirt.libvirtError as exc:
                    st.problem = f"libvirtd: {exc}".splitlines()[0]
            if not st.sshd_ok and not st.problem:
                st.problem = "sshd does not answer"
            out.append(st)
        return out

    # --- down -----------------------------------------------------------------------
    def down(self) -> list[str]:
        """Stop every process the lab started and delete its namespaces."""
        require_root()
        return self._teardown()

    def _pid_files(self) -> Iterator[tuple[Path, str]]:
        """(pid file, namespace it must live in) for everything the lab may have started."""
        hosts_dir = self.dir / "hosts"
        if not hosts_dir.is_dir():
            return
        for root in sorted(hosts_dir.iterdir()):
            ns = self.prefix + root.name
            qemu_pids = sorted((root / "run" / "libvirt" / "qemu").glob("*.pid"))
            # driver.pid is libvirtd's own lock file, not a guest; libvirtd.pid covers it.
            yield from ((p, ns) for p in qemu_pids if p.name != "driver.pid")
            # extra sshds (start_extra_sshd) before the host's own daemons
            yield from ((p, ns) for p in sorted((root / "run").glob("sshd-*.pid")))
            for rel in ("run/sshd.pid", "run/libvirt/libvirtd.pid", "run/anchor.pid"):
                yield root / rel, ns

    def _teardown(self) -> list[str]:
        stopped: list[str] = []
        targets: dict[int, str] = {}
        labels: dict[int, str] = {}
        for pid_file, ns in self._pid_files():
            pid = netns.read_pid(pid_file)
            if pid is not None and pid not in targets and netns.pid_in_netns(pid, ns):
                targets[pid] = ns
                labels[pid] = f"{ns}: {pid_file.name.removesuffix('.pid')} ({pid})"
        ours = [n for n in netns.list_netns() if n.startswith(self.prefix)]
        # Anything else still living in our namespaces (a crashed run's daemons whose
        # PID files were lost, SSH sessions): they are ours by construction.
        for _ in range(3):
            for pid, ns in netns.pids_in_netns(ours).items():
                if pid not in targets:
                    targets[pid] = ns
                    labels[pid] = f"{ns}: stray process ({pid})"
            if not targets:
                break
            stopped += [labels[p] for p in netns.kill_all_in_ns(targets)]
            targets = {}
        for proc in self._children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        self._children.clear()
        for ns in ours:
            netns.del_netns(ns)
        link = client_link(self.name)
        if netns.link_exists(link):
            netns.ip("link", "del", link, check=False)
        others = [w.rstrip(":").split("@")[0] for w in
                  netns.ip("-o", "link", "show", check=False).stdout.split() if w.startswith("esc-")]
        if not others:  # the last lab on this machine is gone: leave the routes as found
            netns.ip("route", "del", "unreachable", LAB_SUPERNET, check=False)
        if self.state_file.exists():
            self._write_state(status="down")
        return stopped


# --- helpers ------------------------------------------------------------------------
def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _no_ipv6(ns: str) -> None:
    """No IPv6 in the lab: no link-local chatter, nothing to reason about but IPv4."""
    netns.in_ns(ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1", check=False)


def _ensure_user(user: str) -> None:
    """libvirt resolves its default QEMU user before reading qemu.conf: it must exist."""
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        netns.run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", user])


def _caps_dir(h: LabHost) -> Path:
    return h.root / "var" / "cache" / "libvirt" / "qemu" / "capabilities"


def _seed_caps(cache: Path, hosts: list[LabHost]) -> bool:
    """Copy cached QEMU capabilities into each host (libvirt re-probes stale ones)."""
    files = sorted(cache.glob("*.xml")) if cache.is_dir() else []
    if not files:
        return False
    for h in hosts:
        for f in files:
            shutil.copy2(f, _caps_dir(h) / f.name)
    return True


def _copy_caps(h: LabHost, cache: Path) -> None:
    files = sorted(_caps_dir(h).glob("*.xml"))
    if not files:
        return
    cache.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, cache / f.name)
