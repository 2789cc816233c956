"""The lab's fixed plan: which hosts, which regions, which guests, which addresses.

Addresses (see docs/LAB.md for the diagram). Every lab gets an index ``N`` (1-254),
chosen so that two labs on one machine never share a subnet:

* front network ``198.18.N.0/24`` (RFC 2544 benchmarking range, never routed on the
  Internet): the root namespace's veth ``esc-<name>`` is ``.1``, the jump host ``.2``.
  This one veth is the only link between the root namespace and the lab; it carries
  a connected /24 route and nothing else (no default route, no forwarding in the jump
  host), so traffic can only reach addresses of namespaces we created.
* back / migration network ``198.19.N.0/24``: the jump host ``.1``, the hypervisors
  ``.11`` upwards. Only the jump host can reach it: hypervisors are reachable over
  SSH through the jump host only, and QEMU migrates over this network.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from console.core.errors import InputError

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")
FRONT_FMT = "198.18.{n}.{h}"
BACK_FMT = "198.19.{n}.{h}"
PREFIX_LEN = 24
#: Both lab ranges; the root namespace routes it to "unreachable" while a lab exists.
LAB_SUPERNET = "198.18.0.0/15"


@dataclass(frozen=True)
class GuestPlan:
    """A tiny TCG guest and the owner who signs its placement policy."""

    name: str
    owner: str
    memory_mib: int = 64
    trust: tuple[str, ...] = ("root",)  # CAs the owner trusts: "root" or a region's CA
    require: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (key, values) as in a policy
    labels: tuple[str, ...] = ()  # grants may cover "all of an owner's VMs labelled web"


@dataclass(frozen=True)
class HostPlan:
    """One hypervisor as its certificate will describe it."""

    name: str
    region: str
    country: str
    locality: str
    issuer: str  # "eu-central" | "eu-west" (intermediates of the tree) | "rogue"
    policies: tuple[str, ...]
    octet: int  # last octet on the back network
    guests: tuple[GuestPlan, ...] = field(default_factory=tuple)


OWNERS = ("alice", "bob")

HYPERVISORS: tuple[HostPlan, ...] = (
    HostPlan("fra-1", "eu-central", "DE", "Frankfurt", "eu-central", ("assurance:high",), 11,
             (GuestPlan("web-1", "alice", trust=("eu-central", "eu-west"), labels=("web",)),
              GuestPlan("db-1", "bob", trust=("eu-central",),
                        require=(("policies", ("assurance:high",)),), labels=("db",)))),
    HostPlan("fra-2", "eu-central", "DE", "Frankfurt", "eu-central", ("assurance:high",), 12,
             (GuestPlan("web-2", "alice", trust=("eu-central", "eu-west"), labels=("web",)),)),
    HostPlan("par-1", "eu-west", "FR", "Paris", "eu-west", ("assurance:medium",), 13,
             (GuestPlan("app-1", "alice", trust=("root",), require=(("country", ("DE", "FR")),),
                        labels=("app",)),)),
    HostPlan("rogue-1", "eu-central", "DE", "Frankfurt", "rogue", ("assurance:high",), 14,
             (GuestPlan("stray-1", "bob", trust=("eu-central",)),)),
)

JUMP = "jump"
JUMP_FRONT_OCTET = 2
JUMP_BACK_OCTET = 1
CLIENT_FRONT_OCTET = 1


def check_name(name: str) -> str:
    """Lab names end up in interface names (15 bytes max): keep them short and plain."""
    if not NAME_RE.match(name):
        raise InputError(f"lab name {name!r}: use 1-10 lowercase letters/digits, starting with a letter")
    return name


def ns_prefix(lab: str) -> str:
    """Every namespace of lab ``lab`` starts with this; crash recovery relies on it."""
    return f"esc-{lab}-"


def client_link(lab: str) -> str:
    """The root-namespace end of the front veth (``esc-<lab>``, at most 14 bytes)."""
    return f"esc-{lab}"


def front_ip(index: int, octet: int) -> str:
    return FRONT_FMT.format(n=index, h=octet)


def back_ip(index: int, octet: int) -> str:
    return BACK_FMT.format(n=index, h=octet)


def front_net(index: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"198.18.{index}.0/{PREFIX_LEN}")


def hypervisor(name: str) -> HostPlan:
    for plan in HYPERVISORS:
        if plan.name == name:
            return plan
    raise InputError(f"no lab host {name!r}; hosts: {', '.join(p.name for p in HYPERVISORS)}, {JUMP}")


@dataclass(frozen=True)
class LabHost:
    """Where one lab host lives: names, addresses and paths (returned by ``Lab.host``)."""

    name: str
    kind: str  # "hypervisor" | "jump"
    ns: str  # network namespace
    root: Path  # private copies of /etc/libvirt, /run/libvirt, ... live under here
    ssh_ip: str  # the address sshd is reached at (front for the jump host, back otherwise)
    migration_ip: str  # back network address ("" never: the jump host has one too)
    switch_port: str  # the veth leg in the switch namespace (cut_link downs it)
    plan: HostPlan | None = None

    @property
    def anchor_pid_file(self) -> Path:
        return self.root / "run" / "anchor.pid"

    @property
    def sshd_pid_file(self) -> Path:
        return self.root / "run" / "sshd.pid"

    @property
    def libvirtd_pid_file(self) -> Path:
        return self.root / "run" / "libvirt" / "libvirtd.pid"

    @property
    def libvirt_sock(self) -> Path:
        return self.root / "run" / "libvirt" / "libvirt-sock"

    @property
    def libvirt_uri(self) -> str:
        """A URI the root namespace can open directly (no SSH): the host's Unix socket."""
        return f"qemu+unix:///system?socket={self.libvirt_sock}"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def pki_dir(self) -> Path:
        return self.root / "etc" / "pki" / "qemu"
