"""Certificates, owners and a stand-in owners' store for the trust-core tests.

``FakeOwners`` implements only ``verify_owner`` (issuer match, signature, dates) so
that envelope/policy/grant tests do not depend on the full ``pki`` chain checks,
which have their own tests; the service and CLI tests use the real ``TrustStore``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from console.core import issuance as iss
from console.core.pki import ChainResult
from console.core.reasons import Reason

T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


def fp(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


@dataclass
class Owner:
    name: str
    email: str
    key: iss.PrivateKey
    cert: x509.Certificate
    chain: list[x509.Certificate]


@dataclass
class FakeOwners:
    """verify_owner against one CA: enough to exercise the envelope logic."""

    ca: x509.Certificate
    calls: list[str] = field(default_factory=list)

    def verify_owner(self, cert: x509.Certificate, intermediates: Iterable[x509.Certificate],
                     at: dt.datetime) -> ChainResult:
        self.calls.append(fp(cert))
        reasons: list[Reason] = []
        if cert.issuer != self.ca.subject:
            reasons.append(Reason("cert.untrusted", "not issued by the owners' CA"))
        else:
            try:
                cert.verify_directly_issued_by(self.ca)
            except (ValueError, TypeError, Exception):
                reasons.append(Reason("cert.signature", "bad signature"))
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            reasons.append(Reason("cert.expired", "outside its validity"))
        return ChainResult(not reasons, tuple(reasons), leaf=None)


@dataclass
class Kit:
    root: iss.Issuer
    eu: iss.Issuer
    us: iss.Issuer
    owners_ca: iss.Issuer
    rogue_owners_ca: iss.Issuer
    owners: FakeOwners
    alice: Owner
    bob: Owner
    carol: Owner
    mallory: Owner  # owner certificate from a CA the console does not trust


#: What the kit's intermediates assert: a host's placement OID counts only if every CA
#: on its path asserts it (docs/PKI.md).
CA_POLICIES = ("assurance:low", "assurance:medium", "assurance:high")


def _ca(cn: str, kind: str = "ec", issuer: iss.Issuer | None = None) -> iss.Issuer:
    key = iss.make_key(kind)
    spec = iss.CASpec(iss.Subject(cn, organization="Escort Test"),
                      policies=CA_POLICIES if issuer is not None else ())
    cert = iss.issue_ca(spec, key, iss.Validity.days(3650, start=T0 - dt.timedelta(days=365)), issuer=issuer)
    return iss.Issuer(cert, key)


def empty_crl(ca: iss.Issuer) -> bytes:
    """A current, empty CRL of ``ca`` (revocation fails closed without one)."""
    return iss.crl_pem(iss.issue_crl(ca, [], iss.Validity.days(3650, start=T0 - dt.timedelta(days=365))))


def crl_files(kit: Kit) -> list[tuple[str, bytes]]:
    """Empty CRLs of the kit's host CAs (root, EU, US) as (source, PEM) pairs."""
    return [(f"{n}.crl", empty_crl(c)) for n, c in (("root", kit.root), ("eu", kit.eu), ("us", kit.us))]


def _owner(name: str, email: str, kind: str, ca: iss.Issuer) -> Owner:
    key = iss.make_key(kind)
    cert = iss.issue_owner(iss.Subject(name, organization="Owners"), key, ca,
                           iss.Validity.days(730, start=T0 - dt.timedelta(days=30)), email=email)
    return Owner(name, email, key, cert, [cert])


def make_kit() -> Kit:
    root = _ca("Test Root")
    owners_ca = _ca("Owners CA")
    rogue = _ca("Rogue Owners CA")
    return Kit(
        root=root,
        eu=_ca("Region EU", issuer=root),
        us=_ca("Region US", issuer=root),
        owners_ca=owners_ca,
        rogue_owners_ca=rogue,
        owners=FakeOwners(owners_ca.cert),
        alice=_owner("Alice", "alice@example.org", "ec", owners_ca),
        bob=_owner("Bob", "bob@example.org", "rsa", owners_ca),
        carol=_owner("Carol", "carol@example.org", "ed25519", owners_ca),
        mallory=_owner("Mallory", "mallory@example.org", "ec", rogue),
    )


def host_cert(issuer: iss.Issuer, name: str, *, country: str = "DE", locality: str = "Berlin",
              policies: tuple[str, ...] = ("assurance:high",), days: float = 365,
              start: dt.datetime | None = None) -> tuple[x509.Certificate, iss.PrivateKey]:
    key = iss.make_key("ec")
    spec = iss.HostSpec(name, country=country, locality=locality, organization="Escort Test",
                        policies=policies)
    cert = iss.issue_host(spec, key, issuer,
                          iss.Validity.days(days, start=start or T0 - dt.timedelta(days=10)))
    return cert, key


# --------------------------------------------------------------------------- a fleet on disk

WEB_UUID = "6f1c1e1a-8d7b-4c36-9d61-2a3f6a0b9e11"
DB_UUID = "0b8e5b8e-2f7a-4a4b-8a56-7f1e4e1c2d33"
ANNE_KEY = "SHA256:" + "k" * 43


@dataclass
class FleetFiles:
    root: Path
    fleet: Path
    kit: Kit
    alice_key: Path
    alice_cert: Path


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def build_fleet(root: Path, kit: Kit | None = None) -> FleetFiles:
    """A small fleet in ``root``: 4 hosts (2 EU, 1 US, 1 expired), 2 VMs with policies, 1 grant.

    Everything is issued with ``console.core.issuance``, the way `escort pki` does.
    """
    from console.core import grants as gr
    from console.core import policy as pol

    kit = kit or make_kit()
    for name, ca in (("root", kit.root), ("eu", kit.eu), ("us", kit.us)):
        _write(root / "trust" / "hosts" / f"{name}.pem", iss.cert_pem(ca.cert))
        _write(root / "trust" / "hosts" / f"{name}.crl", empty_crl(ca))
    _write(root / "trust" / "owners" / "owners-ca.pem", iss.cert_pem(kit.owners_ca.cert))
    _write(root / "trust" / "owners" / "owners-ca.crl", empty_crl(kit.owners_ca))
    hosts = {
        "hv-de-1": host_cert(kit.eu, "hv-de-1", country="DE", locality="Berlin"),
        "hv-fr-1": host_cert(kit.eu, "hv-fr-1", country="FR", locality="Paris"),
        "hv-us-1": host_cert(kit.us, "hv-us-1", country="US", locality="Austin"),
        "hv-de-old": host_cert(kit.eu, "hv-de-old", country="DE", start=T0 - dt.timedelta(days=400),
                               days=30),
    }
    for name, (cert, _key) in hosts.items():
        _write(root / "certs" / f"{name}.pem", iss.cert_pem(cert))
    alice_key = _write(root / "owners" / "alice-key.pem", iss.key_pem(kit.alice.key))
    alice_cert = _write(root / "owners" / "alice-cert.pem", iss.cert_pem(kit.alice.cert))
    start, end = T0 - dt.timedelta(days=1), T0 + dt.timedelta(days=90)
    web = pol.build_policy_payload(
        owner=kit.alice.email, vm_uuid=WEB_UUID, vm_name="web-1",
        trusted_cas=[("Region EU", fp(kit.eu.cert))],
        require={"country": ["DE", "FR"], "policies": ["assurance:high"]}, not_before=start, not_after=end,
        labels=["web"])
    db = pol.build_policy_payload(
        owner=kit.alice.email, vm_uuid=DB_UUID, vm_name="db-1",
        trusted_cas=[("Test Root", fp(kit.root.cert))],
        require={"country": ["US", "DE"]}, not_before=start, not_after=end)
    _write(root / "policies" / "web-1.jws", pol.sign_policy(web, kit.alice.key, kit.alice.chain))
    _write(root / "policies" / "db-1.jws", pol.sign_policy(db, kit.alice.key, kit.alice.chain))
    grant = gr.build_grant_payload(owner=kit.alice.email, admin=gr.AdminRef("anne", ANNE_KEY),
                                   vms=[WEB_UUID], not_before=T0 - dt.timedelta(hours=1),
                                   not_after=T0 + dt.timedelta(hours=8))
    _write(root / "grants" / "anne-web.jws", gr.sign_grant(grant, kit.alice.key, kit.alice.chain))
    fleet = _write(root / "fleet.toml", f"""
name = "test fleet"
kind = "lab"
trust_dir = "trust/hosts"
owners_trust_dir = "trust/owners"
grants = ["grants"]

[[hosts]]
name = "hv-de-1"
region = "eu"
cert_file = "certs/hv-de-1.pem"

[[hosts]]
name = "hv-fr-1"
region = "eu"
cert_file = "certs/hv-fr-1.pem"

[[hosts]]
name = "hv-us-1"
region = "us"
cert_file = "certs/hv-us-1.pem"

[[hosts]]
name = "hv-de-old"
region = "eu"
cert_file = "certs/hv-de-old.pem"

[[admins]]
id = "anne"
ssh_key_fingerprint = "{ANNE_KEY}"

[[admins]]
id = "bert"
ssh_key_fingerprint = "SHA256:{'b' * 43}"

[[vms]]
uuid = "{WEB_UUID}"
name = "web-1"
host = "hv-de-1"
policy_file = "policies/web-1.jws"

[[vms]]
uuid = "{DB_UUID}"
name = "db-1"
host = "hv-us-1"
policy_file = "policies/db-1.jws"
""")
    return FleetFiles(root, fleet, kit, alice_key, alice_cert)
