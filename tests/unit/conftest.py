"""Shared fixtures: a demo CA tree built with ``console.core.issuance``.

Stable for other test modules: ``demo_pki`` (EC keys, session-wide), ``make_demo_pki``
(any key type), and the ``DemoPKI`` helpers ``host()``, ``owner()``, ``crl()``,
``trust_files()``, ``owners_files()``, ``store()`` and ``write_trust_dir()``.
Everything is dated from ``DEMO_START`` so tests pass ``at=demo.at`` and never
depend on the clock.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509

from console.cli.pki_cmds import DemoCA, DemoTree, build_demo_tree
from console.core import issuance as iss
from console.core.pki import MissingCRL, Problem, TrustStore

DEMO_START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
#: The time tests check at: well inside every demo certificate's validity.
DEMO_AT = DEMO_START + dt.timedelta(days=30)


@dataclass
class DemoPKI:
    tree: DemoTree
    key_type: str = "ec"
    at: dt.datetime = DEMO_AT
    _serial: int = field(default=1000)
    _default_crls: dict[x509.Name, tuple[str, bytes]] | None = None

    @property
    def root(self) -> DemoCA:
        return self.tree.root

    @property
    def regions(self) -> dict[str, DemoCA]:
        return self.tree.regions

    @property
    def owners(self) -> DemoCA:
        return self.tree.owners

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def host(self, hostname: str = "h1.example", region: str = "eu-central", *,
             key_type: str | None = None, policies: Sequence[str] = ("assurance:high",),
             ips: Sequence[str] = (), dns: Sequence[str] = (), site: str | None = "Frankfurt",
             country: str | None = None, days: float = 365, start: dt.datetime | None = None,
             serial: int | None = None,
             issuer: iss.Issuer | None = None) -> tuple[x509.Certificate, iss.PrivateKey]:
        """A host certificate under ``region`` (or ``issuer``), valid from DEMO_START."""
        ca = self.regions[region]
        country = country or str(ca.cert.subject.get_attributes_for_oid(x509.NameOID.COUNTRY_NAME)[0].value)
        key = iss.make_key(key_type or self.key_type)
        spec = iss.HostSpec(hostname, country=country, locality=site, organization="Escort Demo",
                            dns_names=dns, ips=ips, policies=policies)
        cert = iss.issue_host(spec, key, issuer or ca.issuer,
                              iss.Validity.days(days, start=start or DEMO_START),
                              serial=serial if serial is not None else self.next_serial())
        return cert, key

    def owner(self, name: str = "Alice Example", email: str | None = "alice@example.org", *,
              issuer: iss.Issuer | None = None) -> tuple[x509.Certificate, iss.PrivateKey]:
        key = iss.make_key(self.key_type)
        cert = iss.issue_owner(iss.Subject(name), key, issuer or self.owners.issuer,
                               iss.Validity.days(365, start=DEMO_START), email=email,
                               serial=self.next_serial())
        return cert, key

    def crl(self, ca: DemoCA, revoked: Iterable[int] = (), *, start: dt.datetime | None = None,
            days: float = 60, number: int = 1) -> bytes:
        """A PEM CRL by ``ca`` revoking ``revoked`` serials (revocation date = CRL start)."""
        begin = start or DEMO_START
        return iss.crl_pem(iss.issue_crl(ca.issuer, [(s, begin) for s in revoked],
                                         iss.Validity.days(days, start=begin), number=number))

    def default_crls(self) -> dict[x509.Name, tuple[str, bytes]]:
        """An empty, long-lived CRL for every demo CA (revocation fails closed without one)."""
        if self._default_crls is None:
            self._default_crls = {
                ca.cert.subject: (f"{ca.stem}.crl.pem",
                                  self.crl(ca, start=DEMO_START - dt.timedelta(days=30), days=3 * 3650))
                for ca in self.tree.all()}
        return self._default_crls

    def with_crls(self, certs: Iterable[tuple[str, bytes]], crls: Iterable[tuple[str, bytes]] = ()
                  ) -> list[tuple[str, bytes]]:
        """``crls`` plus the default CRL of every demo CA in ``certs`` that ``crls`` does not cover."""
        crls = list(crls)
        covered = {x509.load_pem_x509_crl(d).issuer for _, d in crls if d.startswith(b"-----BEGIN X509 CRL")}
        present: set[x509.Name] = set()
        for _, data in certs:
            try:
                present.update(c.subject for c in x509.load_pem_x509_certificates(data))
            except ValueError:  # junk on purpose: the store reports it
                continue
        extra = [crl for subject, crl in self.default_crls().items()
                 if subject in present and subject not in covered]
        return [*crls, *extra]

    def build(self, certs: Iterable[tuple[str, bytes]], crls: Iterable[tuple[str, bytes]] = (), *,
              at: dt.datetime | None = None, missing_crl: MissingCRL = "refuse"
              ) -> tuple[TrustStore, list[Problem]]:
        """``TrustStore.build`` with the demo CAs' default CRLs added (see ``with_crls``).

        ``missing_crl="warn"`` is for tests about other checks that add CAs of their own
        without a CRL (revocation itself is tested with the default, "refuse").
        """
        certs = list(certs)
        return TrustStore.build(certs, self.with_crls(certs, crls), at=at or self.at, missing_crl=missing_crl)

    def trust_files(self) -> list[tuple[str, bytes]]:
        """Root + regional CAs as (source, PEM) pairs: the hosts' trust directory."""
        return [(f"{ca.stem}.pem", iss.cert_pem(ca.cert)) for ca in [self.root, *self.regions.values()]]

    def owners_files(self) -> list[tuple[str, bytes]]:
        return [(f"{self.owners.stem}.pem", iss.cert_pem(self.owners.cert))]

    def store(self, crls: Iterable[tuple[str, bytes]] = (), *, extra: Iterable[tuple[str, bytes]] = (),
              at: dt.datetime | None = None, missing_crl: MissingCRL = "refuse") -> TrustStore:
        store, _problems = self.build([*self.trust_files(), *extra], crls, at=at, missing_crl=missing_crl)
        return store

    def write_trust_dir(self, path: Path, crls: Iterable[tuple[str, bytes]] = ()) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        for name, data in [*self.trust_files(), *self.with_crls(self.trust_files(), crls)]:
            (path / name).write_bytes(data)
        return path


_CACHE: dict[str, DemoPKI] = {}


def _demo(key_type: str) -> DemoPKI:
    if key_type not in _CACHE:
        tree = build_demo_tree(key_type=key_type, start=DEMO_START - dt.timedelta(days=30), days=3650)
        _CACHE[key_type] = DemoPKI(tree, key_type=key_type)
    return _CACHE[key_type]


@pytest.fixture(scope="session")
def demo_pki() -> DemoPKI:
    """The demo CA tree with EC P-256 keys (built once per test session)."""
    return _demo("ec")


@pytest.fixture(scope="session")
def make_demo_pki() -> Callable[[str], DemoPKI]:
    """``make_demo_pki("rsa" | "ec" | "ed25519")``: the demo tree with that key type."""
    return _demo
