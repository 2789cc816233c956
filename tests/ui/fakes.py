"""A small in-memory fleet with the FleetService shape, for UI tests and the benchmark.

Not a product fake: the console ships only with console.services.fleet.FleetService.
Certificates are real (issued with core/issuance.py from seeded Ed25519 keys, so
fingerprints are stable); decisions are computed by a tiny rule set here so UI tests do
not depend on the trust core's exact wording.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ed25519

from console.core import issuance as iss
from console.core.errors import ReadOnlyError
from console.core.inventory import FleetKind, HostSpec, HostView, VMView
from console.core.pki import CANode, CertInfo, ChainResult, HostAttributes
from console.core.reasons import Reason

AT = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)


def _key(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def _info(cert: object, name: str, *, is_ca: bool, serial: int, start: dt.datetime,
          end: dt.datetime, issuer: str) -> CertInfo:
    return CertInfo(cert=cert, name=name, subject=f"CN={name},O=Demo", issuer=issuer,  # type: ignore[arg-type]
                    serial=serial, fingerprint=hashlib.sha256(name.encode()).hexdigest(),
                    not_before=start, not_after=end, is_ca=is_ca, path_len=None,
                    key_type="Ed25519", source=f"trust/{name}.pem")


class FakeNode(CANode):
    def status(self, at: dt.datetime):  # type: ignore[no-untyped-def]
        if self.revoked:
            return "revoked"
        days = self.info.days_left(at)
        if self.info.not_after <= at:
            return "expired"
        return "expiring" if days < 14 else "valid"


@dataclass
class FakeTrust:
    anchors: list[CANode]


@dataclass
class FakeDecision:
    vm: str
    host: str
    allowed: bool
    reasons: tuple[Reason, ...]
    steps: tuple[object, ...] = ()
    admin: str | None = None


@dataclass
class FakeStep:
    title: str
    ok: bool | None
    detail: str


@dataclass
class FakeFleet:
    hosts_: list[HostView]
    vms_: list[VMView]
    trust: FakeTrust | None
    policies: dict[str, frozenset[str]]  # vm uuid -> allowed countries
    kind: FleetKind = "demo"
    name: str = "fake"
    readonly: bool = False
    at: dt.datetime = AT
    problems: list[str] = field(default_factory=list)
    writes_refused: int = 0

    def hosts(self) -> list[HostView]:
        return self.hosts_

    def vms(self) -> list[VMView]:
        return self.vms_

    def explain(self, vm: str, host: str, admin: str | None = None, at: object = None) -> FakeDecision:
        h = next(x for x in self.hosts_ if x.name == host)
        reasons: list[Reason] = []
        countries = self.policies.get(vm)
        country = h.attributes.country if h.attributes else None
        if countries is None:
            reasons.append(Reason("policy.missing", "the VM has no signed policy",
                                  "ask the owner to sign one"))
        elif country not in countries:
            reasons.append(Reason("attr.country", f"host is in {country}, policy allows "
                                  f"{', '.join(sorted(countries))}", "pick a host in an allowed country"))
        if h.cert_problem is not None:
            reasons.append(h.cert_problem)
        steps = (FakeStep("Owner's policy", countries is not None, "policy signed by owner"),
                 FakeStep("Host certificate", h.cert_problem is None, "chain checked"),
                 FakeStep("Attributes matched", not any(r.code == "attr.country" for r in reasons),
                          f"country {country}"))
        return FakeDecision(vm, host, not reasons, tuple(reasons), steps, admin)

    def targets(self, vm: str) -> list[FakeDecision]:
        return [self.explain(vm, h.name) for h in self.hosts_]

    def dependants(self, ca_fp: str) -> tuple[int, int]:
        return (len(self.hosts_), len(self.vms_))

    def require_writable(self, action: str) -> None:
        if self.readonly:
            self.writes_refused += 1
            raise ReadOnlyError(f"read-only mode: {action} is disabled")


COUNTRIES = ("DE", "FR", "NL", "US")


def make_fleet(n_hosts: int = 6, n_vms: int = 12, *, readonly: bool = False) -> FakeFleet:
    """A deterministic fleet: n_hosts hosts over 4 countries, VMs allowing 1-2 countries."""
    start = AT - dt.timedelta(days=100)
    root_key = _key("root")
    root_cert = iss.issue_ca(iss.CASpec(iss.Subject("Demo Root CA", organization="Demo")), root_key,
                             iss.Validity(start, AT + dt.timedelta(days=3650)), serial=1)
    root = FakeNode(_info(root_cert, "Demo Root CA", is_ca=True, serial=1, start=start,
                          end=AT + dt.timedelta(days=3650), issuer="CN=Demo Root CA,O=Demo"))
    regions = {"eu": ("Demo EU CA", 400, False), "us": ("Demo US CA", 10, False),
               "ap": ("Demo AP CA", 400, True)}
    for i, (_region, (name, days, revoked)) in enumerate(regions.items(), 2):
        node = FakeNode(_info(root_cert, name, is_ca=True, serial=i, start=start,
                              end=AT + dt.timedelta(days=days), issuer="CN=Demo Root CA,O=Demo"),
                        parent=root, revoked=revoked)
        root.children.append(node)
    hosts: list[HostView] = []
    for i in range(n_hosts):
        country = COUNTRIES[i % len(COUNTRIES)]
        name = f"{country.lower()}-host-{i:03d}"
        region = "us" if country == "US" else "eu"
        expired = i == 1
        end = AT - dt.timedelta(days=3) if expired else AT + dt.timedelta(days=200 + i)
        attrs = HostAttributes(common_name=name, country=country, state=None, locality=f"{country}1",
                               organization="Demo", org_unit=None, dns_names=(name,), ips=(),
                               policies=frozenset({"assurance:high" if i % 2 else "assurance:medium"}),
                               not_after=end)
        leaf = _info(root_cert, name, is_ca=False, serial=100 + i, start=start, end=end,
                     issuer="CN=Demo EU CA,O=Demo")
        problem = Reason("cert.expired", "host certificate expired 3 days ago",
                         "renew the host certificate") if expired else None
        chain = ChainResult(valid=not expired, reasons=(problem,) if problem else (),
                            chain=(leaf, root.children[0].info, root.info), leaf=leaf)
        hosts.append(HostView(spec=HostSpec(name=name, region=region,
                                            libvirt_uri=f"test:///demo/{name}.xml"),
                              reachability="up" if i != 2 else "down", chain=chain,
                              attributes=attrs, cert_problem=problem,
                              problem=Reason("host.unreachable", "libvirt did not answer",
                                             "check the host") if i == 2 else None))
    vms: list[VMView] = []
    policies: dict[str, frozenset[str]] = {}
    for j in range(n_vms):
        uuid = f"00000000-0000-4000-8000-{j:012d}"
        allowed = frozenset(COUNTRIES[j % 3: j % 3 + 1 + j % 2])
        if j == 3:
            vms.append(VMView(uuid=uuid, name=f"vm-{j:04d}", host=hosts[j % n_hosts].name,
                              owner="", policy_problems=(Reason("policy.missing",
                                                                "no policy in the domain metadata",
                                                                "ask the owner to sign one"),)))
            continue
        policies[uuid] = allowed
        targets = tuple(h.name for h in hosts
                        if h.attributes and h.attributes.country in allowed and h.cert_problem is None)
        vms.append(VMView(uuid=uuid, name=f"vm-{j:04d}", host=hosts[j % n_hosts].name,
                          owner=f"team-{j % 5}", state="running",
                          policy_summary=f"country {' or '.join(sorted(allowed))}",
                          allowed_targets=targets))
    return FakeFleet(hosts, vms, FakeTrust([root]), policies, readonly=readonly)
