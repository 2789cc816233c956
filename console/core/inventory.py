"""What the console knows about a fleet: hosts, VMs, admins, and how to reach them.

``FleetSpec`` is the fleet file after parsing (adapters/files.py reads TOML into it).
``HostFacts``/``DomainFacts`` are what a refresh learned from libvirt (adapters/libvirt.py).
``HostView``/``VMView`` combine both with the trust checks; the UI and the CLI only
ever read views.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Literal

from .pki import ChainResult, HostAttributes
from .reasons import Reason

FleetKind = Literal["demo", "lab", "real"]
Reachability = Literal["unknown", "up", "down"]


@dataclass(frozen=True)
class HostSpec:
    """One [[hosts]] entry of the fleet file."""

    name: str
    region: str = ""
    ssh: str = ""  # "user@host[:port]" or an ~/.ssh/config alias; "" for local/test driver
    jump: str = ""  # ProxyJump, "" for none (else ~/.ssh/config decides)
    libvirt_uri: str = "qemu:///system"  # URI *on the host*; test:///... for the demo
    cert_file: str = ""  # local copy of the host's migration certificate (PEM/DER)
    remote_cert: str = "/etc/pki/qemu/server-cert.pem"  # read over SSH when ssh is set
    migration_address: str = ""  # address QEMU listens on for migration (dest URI)
    tls_name: str = ""  # name expected in the cert for VIR_MIGRATE_PARAM_TLS_DESTINATION
    guard_no_policy: str = "admit"  # the host guard's answer for VMs without any policy: admit | refuse


@dataclass(frozen=True)
class AdminSpec:
    id: str
    ssh_key_fingerprint: str = ""  # "SHA256:..."
    cert_fingerprint: str = ""


@dataclass(frozen=True)
class VMSpec:
    """A VM the fleet file names explicitly (the demo and tests); real VMs come from libvirt."""

    uuid: str
    name: str
    host: str
    policy_file: str = ""
    memory_mib: int = 0
    vcpus: int = 0


@dataclass(frozen=True)
class FleetSpec:
    name: str
    kind: FleetKind
    base_dir: str  # relative paths in the file are relative to this
    trust_dir: str  # host CA tree (certs + CRLs)
    owners_trust_dir: str  # owners' CA (signs policies and grants)
    known_hosts: str = ""
    ssh_config: str = ""  # "" = ~/.ssh/config
    identity_files: tuple[str, ...] = ()
    audit_log: str = ""
    policy_names: dict[str, str] = field(default_factory=dict)  # "assurance:high" -> OID
    hosts: tuple[HostSpec, ...] = ()
    admins: tuple[AdminSpec, ...] = ()
    grant_files: tuple[str, ...] = ()
    vms: tuple[VMSpec, ...] = ()
    readonly: bool = False
    stall_timeout_s: float = 30.0
    #: A CA on a path that publishes no CRL at all: "refuse" (revocation unknown) or
    #: "warn". Stale, forged or unusable CRLs refuse either way (docs/PKI.md).
    missing_crl: Literal["refuse", "warn"] = "refuse"


@dataclass(frozen=True)
class DomainFacts:
    uuid: str
    name: str
    state: str  # "running", "paused", "shut off", ...
    state_reason: str = ""  # e.g. "migration" when paused for migration
    memory_mib: int = 0
    vcpus: int = 0
    policy_token: str = ""  # compact JWS from <metadata>, "" when none
    persistent: bool = True
    policy_xml: str = ""  # the raw escort <metadata> element as libvirt returned it
    #: libvirt's tainting messages ("tainted: custom monitor control commands issued"...) of a
    #: running domain; () when there are none or libvirt does not report them (test:// driver)
    taints: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostFacts:
    hostname: str
    memory_mib: int
    cpus: int
    free_memory_mib: int
    domains: tuple[DomainFacts, ...]
    cert_pem: bytes = b""  # the migration certificate as read from the host
    fetched_at: dt.datetime | None = None


@dataclass
class HostView:
    spec: HostSpec
    reachability: Reachability = "unknown"
    problem: Reason | None = None  # why it is down / unreadable
    facts: HostFacts | None = None
    chain: ChainResult | None = None
    attributes: HostAttributes | None = None
    cert_problem: Reason | None = None

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class VMView:
    uuid: str
    name: str
    host: str  # current host name ("" if unknown)
    state: str = "unknown"
    memory_mib: int = 0
    vcpus: int = 0
    owner: str = ""
    policy_summary: str = ""
    policy_problems: tuple[Reason, ...] = ()
    allowed_targets: tuple[str, ...] = ()
    checking: bool = False  # not checked yet: the console shows "checking…", never a count
