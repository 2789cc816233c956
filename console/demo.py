"""The demo fleet behind ``escort demo``: realistic, generated, and safe to play with.

Everything is made with escort's own code paths (core/issuance.py for the CA tree,
core/policy.py and core/grants.py for owner-signed documents), so the demo shows
exactly what a real fleet would. Hosts are libvirt ``test://`` driver connections,
one per host, each from a generated node XML whose ``<domain>`` elements carry the
owner-signed policy in ``<metadata>``: listing domains and reading policies are real
libvirt calls, but nothing really migrates.

What is in it (on purpose, so every screen has something to explain):

* ``Escort Demo Root CA`` with three regional intermediates: ``Europe CA`` (valid),
  ``Americas CA`` (expiring in 9 days), ``Asia-Pacific CA`` (revoked by the root's CRL).
* 12 hosts in DE, FR, NL, US, CA, SG, JP at assurance low/medium/high; ``par-02`` has
  an expired certificate and ``ams-02`` is revoked by the Europe CA's CRL.
* 30 VMs with owner-signed policies (one region, several regions, and ``res-gpu-01``
  which only accepts Japan — whose hosts are all under the revoked CA), plus
  ``legacy-01`` with no policy and ``rogue-01`` signed by an owner nobody trusts.
* Admin grants for ``oncall`` (one valid, one expired) and an emergency-only one.

``seed``: derive every key from a seed (Ed25519, whose signatures are deterministic
too) and fix serials, so tests and snapshots get byte-identical fleets.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import platformdirs
import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from console.adapters.files import atomic_write, replace_dir
from console.core import grants as grants_mod
from console.core import issuance as iss
from console.core import policy as policy_mod
from console.core.envelope import fingerprint
from console.core.errors import EscortError, InputError

#: A demo older than this is regenerated so "expiring in 9 days" stays true.
MAX_AGE = dt.timedelta(days=5)
STAMP = "demo.json"
DEMO_VERSION = 1


def demo_dir() -> Path:
    """``<user data dir>/escort/demo`` (XDG on Linux)."""
    return Path(platformdirs.user_data_dir("escort")) / "demo"


# ------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class CAPlan:
    key: str
    name: str
    region: str
    days_left: int
    revoked: bool = False
    key_type: str = "ec"


@dataclass(frozen=True)
class HostPlan:
    name: str
    ca: str
    country: str
    state: str
    site: str
    assurance: str
    expired: bool = False
    revoked: bool = False


@dataclass(frozen=True)
class VMPlan:
    name: str
    owner: str  # "" = no policy at all
    host: str
    trust: tuple[str, ...] = ("root",)
    require: dict[str, tuple[str, ...]] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    memory_mib: int = 2048
    vcpus: int = 2


CAS = (
    CAPlan("eu", "Europe CA", "eu", 1500),
    CAPlan("am", "Americas CA", "americas", 9, key_type="rsa"),
    CAPlan("ap", "Asia-Pacific CA", "apac", 1500, revoked=True),
)

HOSTS = (
    HostPlan("fra-01", "eu", "DE", "Hesse", "Frankfurt", "high"),
    HostPlan("fra-02", "eu", "DE", "Hesse", "Frankfurt", "high"),
    HostPlan("ber-01", "eu", "DE", "Berlin", "Berlin", "medium"),
    HostPlan("par-01", "eu", "FR", "Ile-de-France", "Paris", "high"),
    HostPlan("par-02", "eu", "FR", "Ile-de-France", "Paris", "medium", expired=True),
    HostPlan("ams-01", "eu", "NL", "North Holland", "Amsterdam", "high"),
    HostPlan("ams-02", "eu", "NL", "North Holland", "Amsterdam", "low", revoked=True),
    HostPlan("nyc-01", "am", "US", "New York", "New York", "high"),
    HostPlan("nyc-02", "am", "US", "New York", "New York", "medium"),
    HostPlan("tor-01", "am", "CA", "Ontario", "Toronto", "medium"),
    HostPlan("sgp-01", "ap", "SG", "Singapore", "Singapore", "high"),
    HostPlan("tyo-01", "ap", "JP", "Tokyo", "Tokyo", "medium"),
)

OWNERS = {"alice": "Payments", "bob": "Analytics", "carol": "Web", "dave": "Research"}

_EU = ("DE", "FR", "NL")


def _vms() -> tuple[VMPlan, ...]:
    high = ("assurance:high",)
    vms: list[VMPlan] = []
    for i, host in enumerate(("fra-01", "fra-02", "fra-01", "fra-02"), 1):
        vms.append(VMPlan(f"pay-db-{i:02d}", "alice", host, ("eu",),
                          {"country": ("DE",), "policies": high}, ("payments",), 8192, 4))
    for i, host in enumerate(("par-01", "ams-01", "fra-02"), 1):
        vms.append(VMPlan(f"pay-api-{i:02d}", "alice", host, ("root",),
                          {"country": _EU, "policies": high}, ("payments",), 4096, 2))
    for i, host in enumerate(("ber-01", "par-01", "ams-01", "nyc-01", "nyc-02", "par-02"), 1):
        vms.append(VMPlan(f"web-{i:02d}", "carol", host, ("root",),
                          {"country": (*_EU, "US")}, ("web",), 2048, 2))
    for i, host in enumerate(("nyc-01", "nyc-02", "tor-01", "nyc-01", "tor-01"), 1):
        vms.append(VMPlan(f"ana-{i:02d}", "bob", host, ("am",),
                          {"country": ("US", "CA")}, ("analytics",), 16384, 8))
    for i, host in enumerate(("ber-01", "ams-01", "nyc-02"), 1):
        vms.append(VMPlan(f"res-{i:02d}", "dave", host, ("root",),
                          {"country": ("DE", "NL", "US")}, ("research",), 4096, 4))
    vms.append(VMPlan("res-gpu-01", "dave", "tyo-01", ("ap",), {"country": ("JP",)},
                      ("research",), 32768, 16))
    for i, host in enumerate(("ams-02", "ber-01"), 1):
        vms.append(VMPlan(f"ci-runner-{i:02d}", "carol", host, ("eu",), {}, ("web",), 4096, 4))
    vms.append(VMPlan("mail-01", "carol", "par-01", ("eu",),
                      {"country": ("FR",), "policies": ("assurance:medium",)}, ("web",)))
    vms.append(VMPlan("sgp-cache-01", "bob", "sgp-01", ("root",), {"country": ("SG", "JP")},
                      ("analytics",)))
    vms.append(VMPlan("legacy-01", "", "ber-01"))
    vms.append(VMPlan("rogue-01", "mallory", "nyc-02", ("root",), {}))
    return tuple(vms)


VMS = _vms()


# ------------------------------------------------------------------ keys
class _Keys:
    """Fresh keys, or keys derived from a seed for byte-identical test fleets."""

    def __init__(self, seed: str | None) -> None:
        self.seed = seed
        self._serial = 0x1000

    def key(self, label: str, kind: str = "ec") -> iss.PrivateKey:
        if self.seed is None:
            return iss.make_key(kind)
        digest = hashlib.sha256(f"{self.seed}/{label}".encode()).digest()
        return ed25519.Ed25519PrivateKey.from_private_bytes(digest)

    def serial(self) -> int | None:
        if self.seed is None:
            return None
        self._serial += 1
        return self._serial

    def vm_uuid(self, name: str) -> str:
        if self.seed is None:
            return str(uuidlib.uuid4())
        return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, f"escort-demo:{self.seed}:{name}"))

    def jti(self, label: str) -> str | None:
        return None if self.seed is None else self.vm_uuid("jti:" + label)


def ssh_fingerprint(key: ed25519.Ed25519PrivateKey) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it."""
    blob = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _cn(issuer: iss.Issuer) -> str:
    attrs = issuer.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else issuer.cert.subject.rfc4514_string()


# ------------------------------------------------------------------ writing
def _node_xml(host: HostPlan, domains: Sequence[tuple[VMPlan, str, str]]) -> str:
    """libvirt test driver node XML: the host and its domains with policy metadata."""
    parts = [
        "<node>",
        "  <cpu><mhz>2400</mhz><model>demo</model><active>32</active><nodes>1</nodes>"
        "<sockets>2</sockets><cores>16</cores><threads>1</threads></cpu>",
        f"  <memory>{256 * 1024 * 1024}</memory>",
    ]
    for vm, vm_uuid, metadata in domains:
        meta = f"<metadata>{metadata}</metadata>" if metadata else ""
        parts.append(
            f'  <domain type="test"><name>{escape(vm.name)}</name><uuid>{vm_uuid}</uuid>'
            f'<memory unit="MiB">{vm.memory_mib}</memory><vcpu>{vm.vcpus}</vcpu>'
            f"<os><type>hvm</type></os>{meta}</domain>"
        )
    parts.append("</node>")
    return "\n".join(parts) + "\n"


def generate(dest: Path, *, at: dt.datetime | None = None, seed: str | None = None) -> Path:
    """Build the demo fleet into ``dest`` (replaced as a whole) and return the fleet file.

    Written into a sibling temporary directory first and renamed into place, so an
    interrupted run never leaves half a fleet behind.
    """
    now = at or dt.datetime.now(dt.UTC)
    keys = _Keys(seed)
    final = dest.resolve()
    return replace_dir(final, lambda work: _write_fleet(work, final, now, keys),
                       prefix=".demo-") / "fleet.toml"


def _write_fleet(work: Path, final: Path, now: dt.datetime, keys: _Keys) -> None:
    long_ago = now - dt.timedelta(days=400)
    files: dict[str, bytes] = {}

    # --- host CA tree -----------------------------------------------------------------
    root_key = keys.key("root")
    root_cert = iss.issue_ca(iss.CASpec(iss.Subject("Escort Demo Root CA", "DE", organization="Escort Demo")),
                             root_key, iss.Validity(long_ago, now + dt.timedelta(days=3650)),
                             serial=keys.serial())
    root = iss.Issuer(root_cert, root_key)
    files["trust/root-ca.pem"] = iss.cert_pem(root_cert)
    cas: dict[str, iss.Issuer] = {"root": root}
    revoked_cas: list[tuple[int, dt.datetime]] = []
    for plan in CAS:
        key = keys.key(plan.key, plan.key_type)
        cert = iss.issue_ca(
            iss.CASpec(iss.Subject(plan.name, organization="Escort Demo", org_unit=plan.region),
                       path_len=0,
                       # a CA asserts the certificate policies of the hosts it issues: a
                       # host's placement OID counts only if every CA on its path does
                       policies=sorted({f"assurance:{h.assurance}" for h in HOSTS if h.ca == plan.key})),
            key, iss.Validity(now - dt.timedelta(days=300),
                              now + dt.timedelta(days=plan.days_left, hours=12)),
            issuer=root, serial=keys.serial())
        cas[plan.key] = iss.Issuer(cert, key)
        files[f"trust/{plan.region}-ca.pem"] = iss.cert_pem(cert)
        if plan.revoked:
            revoked_cas.append((cert.serial_number, now - dt.timedelta(days=2)))
    files["trust/root-ca.crl.pem"] = iss.crl_pem(
        iss.issue_crl(root, revoked_cas, _crl_window(now)))

    # --- host certificates ------------------------------------------------------------
    revoked_hosts: dict[str, list[tuple[int, dt.datetime]]] = {p.key: [] for p in CAS}
    for host in HOSTS:
        key = keys.key("host/" + host.name)
        start = now - dt.timedelta(days=400 if host.expired else 100)
        end = now - dt.timedelta(days=3) if host.expired else now + dt.timedelta(days=265)
        cert = iss.issue_host(
            iss.HostSpec(f"{host.name}.demo.escort", host.country, host.state, host.site,
                         "Escort Demo", next(c.region for c in CAS if c.key == host.ca),
                         dns_names=(host.name,), policies=(f"assurance:{host.assurance}",)),
            key, cas[host.ca], iss.Validity(start, end), serial=keys.serial())
        files[f"hosts/{host.name}.pem"] = iss.cert_pem(cert)
        if host.revoked:
            revoked_hosts[host.ca].append((cert.serial_number, now - dt.timedelta(days=1)))
    for plan in CAS:
        files[f"trust/{plan.region}-ca.crl.pem"] = iss.crl_pem(iss.issue_crl(
            cas[plan.key], revoked_hosts[plan.key], _crl_window(now)))

    # --- owners -------------------------------------------------------------------------
    owners_key = keys.key("owners-ca")
    owners_cert = iss.issue_ca(iss.CASpec(iss.Subject("Escort Demo Owners CA", organization="Escort Demo")),
                               owners_key, iss.Validity(long_ago, now + dt.timedelta(days=3650)),
                               serial=keys.serial())
    owners_ca = iss.Issuer(owners_cert, owners_key)
    files["owners-trust/owners-ca.pem"] = iss.cert_pem(owners_cert)
    files["owners-trust/owners-ca.crl.pem"] = iss.crl_pem(iss.issue_crl(owners_ca, [], _crl_window(now)))
    owners: dict[str, iss.Issuer] = {}
    for owner, team in OWNERS.items():
        key = keys.key("owner/" + owner)
        cert = iss.issue_owner(iss.Subject(owner, organization="Escort Demo", org_unit=team), key,
                               owners_ca,
                               iss.Validity(now - dt.timedelta(days=200), now + dt.timedelta(days=700)),
                               email=f"{owner}@demo.escort", serial=keys.serial())
        owners[owner] = iss.Issuer(cert, key)
        files[f"owners/{owner}.pem"] = iss.cert_pem(cert)
    # mallory's certificate comes from a CA the console does not trust
    stray_key = keys.key("stray-ca")
    stray = iss.Issuer(iss.issue_ca(iss.CASpec(iss.Subject("Unknown Owners CA")), stray_key,
                                    iss.Validity(long_ago, now + dt.timedelta(days=3650)),
                                    serial=keys.serial()), stray_key)
    mallory_key = keys.key("owner/mallory")
    owners["mallory"] = iss.Issuer(
        iss.issue_owner(iss.Subject("mallory", organization="Elsewhere"), mallory_key, stray,
                        iss.Validity(now - dt.timedelta(days=10), now + dt.timedelta(days=300)),
                        serial=keys.serial()), mallory_key)

    # --- VMs and their policies ------------------------------------------------------------
    per_host: dict[str, list[tuple[VMPlan, str, str]]] = {h.name: [] for h in HOSTS}
    vm_entries: list[dict[str, Any]] = []
    uuids: dict[str, str] = {}
    for vm in VMS:
        vm_uuid = keys.vm_uuid(vm.name)
        uuids[vm.name] = vm_uuid
        token = ""
        if vm.owner:
            signer = owners[vm.owner]
            payload = policy_mod.build_policy_payload(
                owner=vm.owner, vm_uuid=vm_uuid, vm_name=vm.name,
                trusted_cas=[(_cn(cas[c]), fingerprint(cas[c].cert)) for c in vm.trust],
                require={k: list(v) for k, v in vm.require.items()},
                not_before=now - dt.timedelta(days=30), not_after=now + dt.timedelta(days=335),
                jti=keys.jti("policy/" + vm.name), labels=vm.labels)
            token = policy_mod.sign_policy(payload, signer.key, [signer.cert])
            files[f"policies/{vm.name}.jws"] = token.encode() + b"\n"
        metadata = policy_mod.policy_metadata_xml(token) if token else ""
        per_host[vm.host].append((vm, vm_uuid, metadata))
        entry: dict[str, Any] = {"uuid": vm_uuid, "name": vm.name, "host": vm.host,
                                 "memory_mib": vm.memory_mib, "vcpus": vm.vcpus}
        if token:
            entry["policy_file"] = f"policies/{vm.name}.jws"
        vm_entries.append(entry)

    # --- admins and grants ---------------------------------------------------------------
    oncall = ssh_fingerprint(_ed_key(keys, "admin/oncall"))
    night = ssh_fingerprint(_ed_key(keys, "admin/night-shift"))
    grant_specs = [
        ("oncall-payments", "alice", grants_mod.AdminRef("oncall", ssh_key=oncall),
         [uuids[v.name] for v in VMS if v.owner == "alice"], "", now - dt.timedelta(days=5),
         now + dt.timedelta(days=25), False),
        ("oncall-analytics-expired", "bob", grants_mod.AdminRef("oncall", ssh_key=oncall),
         [], "analytics", now - dt.timedelta(days=40), now - dt.timedelta(days=2), False),
        ("night-shift-web-emergency", "carol", grants_mod.AdminRef("night-shift", ssh_key=night),
         [], "web", now - dt.timedelta(days=1), now + dt.timedelta(days=60), True),
    ]
    grant_files: list[str] = []
    for label, owner, admin, vm_uuids, vm_label, nbf, exp, emergency in grant_specs:
        payload = grants_mod.build_grant_payload(
            owner=owner, admin=admin, vms=vm_uuids, label=vm_label, not_before=nbf,
            not_after=exp, emergency_only=emergency, jti=keys.jti("grant/" + label))
        signer = owners[owner]
        token = grants_mod.sign_grant(payload, signer.key, [signer.cert])
        files[f"grants/{label}.jws"] = token.encode() + b"\n"
        grant_files.append(f"grants/{label}.jws")

    # --- hosts: libvirt test driver node files -----------------------------------------------
    host_entries: list[dict[str, Any]] = []
    region_of = {c.key: c.region for c in CAS}
    for host in HOSTS:
        files[f"nodes/{host.name}.xml"] = _node_xml(host, per_host[host.name]).encode()
        host_entries.append({
            "name": host.name,
            "region": region_of[host.ca],
            "libvirt_uri": f"test://{final / 'nodes' / (host.name + '.xml')}",
            "cert_file": f"hosts/{host.name}.pem",
            "tls_name": f"{host.name}.demo.escort",
        })

    doc: dict[str, Any] = {
        "name": "demo",
        "kind": "demo",
        "trust_dir": "trust",
        "owners_trust_dir": "owners-trust",
        "audit_log": "audit.log",
        "admins": [{"id": "oncall", "ssh_key_fingerprint": oncall},
                   {"id": "night-shift", "ssh_key_fingerprint": night}],
        "grants": grant_files,
        "hosts": host_entries,
        "vms": vm_entries,
    }
    header = ("# escort demo fleet: written by `escort demo` (regenerate with --regenerate).\n"
              "# Hosts are libvirt test:// driver connections: nothing really migrates.\n"
              "# Paths are relative to this file.\n")
    files["fleet.toml"] = (header + tomli_w.dumps(doc)).encode()
    files[STAMP] = json.dumps({"version": DEMO_VERSION, "generated": now.isoformat(),
                               "seeded": keys.seed is not None}).encode()
    for rel, data in files.items():
        atomic_write(work / rel, data, mode=0o644)


def _crl_window(now: dt.datetime) -> iss.Validity:
    """CRLs issued yesterday, next update in a month (fresh, not stale)."""
    return iss.Validity(now - dt.timedelta(days=1), now + dt.timedelta(days=30))


def _ed_key(keys: _Keys, label: str) -> ed25519.Ed25519PrivateKey:
    if keys.seed is None:
        return ed25519.Ed25519PrivateKey.generate()
    return ed25519.Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(f"{keys.seed}/{label}".encode()).digest())


def generated_at(dest: Path) -> dt.datetime | None:
    """When the demo in ``dest`` was made (None when absent or unreadable)."""
    try:
        stamp = json.loads((dest / STAMP).read_text())
        if stamp.get("version") != DEMO_VERSION:
            return None
        return dt.datetime.fromisoformat(stamp["generated"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def ensure_demo(dest: Path | None = None, *, regenerate: bool = False,
                at: dt.datetime | None = None) -> tuple[Path, bool]:
    """The demo fleet file, generating it when absent, stale or asked -> (path, generated)."""
    dest = dest or demo_dir()
    now = at or dt.datetime.now(dt.UTC)
    made = generated_at(dest)
    fresh = made is not None and (dest / "fleet.toml").is_file() and now - made < MAX_AGE
    if fresh and not regenerate:
        return dest / "fleet.toml", False
    try:
        return generate(dest, at=now), True
    except OSError as exc:
        raise InputError(f"{dest}: cannot write the demo fleet ({exc.strerror or exc})") from exc
    except EscortError:
        raise
