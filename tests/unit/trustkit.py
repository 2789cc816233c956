"""Certificates, owners and a stand-in owners' store for the trust-core tests.

``FakeOwners`` implements only ``verify_owner`` (issuer match, signature, dates) so
that envelope/policy/grant tests do not depend on the full ``pki`` chain checks,
which have their own tests; the service and CLI tests use the real ``TrustStore``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

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


def _ca(cn: str, kind: str = "ec", issuer: iss.Issuer | None = None) -> iss.Issuer:
    key = iss.make_key(kind)
    cert = iss.issue_ca(iss.CASpec(iss.Subject(cn, organization="Escort Test")), key,
                        iss.Validity.days(3650, start=T0 - dt.timedelta(days=365)), issuer=issuer)
    return iss.Issuer(cert, key)


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
