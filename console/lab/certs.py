"""The lab's certificates, made with escort's own issuance code (core/issuance.py).

Tree: ``Lab Root CA`` -> ``eu-central CA`` / ``eu-west CA`` -> host certificates;
``Lab Owners CA`` -> owner signing certificates (alice, bob). ``Rogue Root CA`` is a
separate root, not in the trust directory, and signs rogue-1's certificate: the
console must show rogue-1 as untrusted, and QEMU on a tree host refuses it.

Layout under ``DIR/pki`` (keys 0600)::

    trust/          root + intermediates (the fleet's trust_dir)
    owners-trust/   the owners' CA (the fleet's owners_trust_dir)
    owners/         <owner>.pem, <owner>.key (sign policies and grants)
    hosts/          <host>.pem: local copies of each host's migration certificate
    rogue/          the rogue root (not trusted by anyone)
    private/        CA keys (for tests that issue or revoke more)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from console.core import issuance as iss

from .hosts import HostPlan

CA_DAYS = 3650
LEAF_DAYS = 365


@dataclass
class LabPKI:
    root: iss.Issuer
    intermediates: dict[str, iss.Issuer]  # region -> issuing CA
    owners_ca: iss.Issuer
    owners: dict[str, iss.Issuer]  # owner name -> signing cert + key
    rogue_root: iss.Issuer
    hosts: dict[str, tuple[x509.Certificate, iss.PrivateKey]] = field(default_factory=dict)

    def issuer_for(self, plan: HostPlan) -> iss.Issuer:
        return self.rogue_root if plan.issuer == "rogue" else self.intermediates[plan.issuer]

    def qemu_ca_bundle(self, plan: HostPlan) -> bytes:
        """``ca-cert.pem`` for a host: every CA its peers' certificates chain to.

        QEMU sends only the leaf; the peer needs the issuing intermediate of *any*
        tree host to verify it, so tree hosts get the root and all intermediates.
        The rogue host trusts only its own root.
        """
        if plan.issuer == "rogue":
            return iss.cert_pem(self.rogue_root.cert)
        out = b"".join(iss.cert_pem(i.cert) for i in self.intermediates.values())
        return out + iss.cert_pem(self.root.cert)


def _ca(cn: str, *, issuer: iss.Issuer | None, path_len: int | None, validity: iss.Validity,
        country: str | None = None, policies: tuple[str, ...] = ()) -> iss.Issuer:
    key = iss.make_key("ec")
    spec = iss.CASpec(iss.Subject(cn, country=country, organization="escort lab"), path_len=path_len,
                      policies=policies)
    return iss.Issuer(iss.issue_ca(spec, key, validity, issuer=issuer), key)


def build(lab: str, plans: tuple[HostPlan, ...], back_ips: dict[str, str]) -> LabPKI:
    """Issue the whole lab PKI in memory (EC P-256; about 20 ms)."""
    ca_validity = iss.Validity.days(CA_DAYS)
    leaf_validity = iss.Validity.days(LEAF_DAYS)
    root = _ca(f"Lab Root CA ({lab})", issuer=None, path_len=1, validity=ca_validity)

    def asserted(region: str) -> tuple[str, ...]:
        # A CA asserts exactly the certificate policies of the hosts it issues: a
        # host's placement OID counts only if every CA on its path asserts it.
        return tuple(sorted({p for plan in plans if plan.issuer == region for p in plan.policies}))

    intermediates = {
        "eu-central": _ca("eu-central CA", issuer=root, path_len=0, validity=ca_validity, country="DE",
                          policies=asserted("eu-central")),
        "eu-west": _ca("eu-west CA", issuer=root, path_len=0, validity=ca_validity, country="FR",
                       policies=asserted("eu-west")),
    }
    owners_ca = _ca(f"Lab Owners CA ({lab})", issuer=None, path_len=0, validity=ca_validity)
    owners: dict[str, iss.Issuer] = {}
    for owner in ("alice", "bob"):
        key = iss.make_key("ec")
        cert = iss.issue_owner(iss.Subject(owner, organization="escort lab owners"), key, owners_ca,
                               leaf_validity, email=f"{owner}@lab.invalid")
        owners[owner] = iss.Issuer(cert, key)
    rogue_root = _ca("Rogue Root CA", issuer=None, path_len=0, validity=ca_validity)
    pki = LabPKI(root, intermediates, owners_ca, owners, rogue_root)
    for plan in plans:
        key = iss.make_key("ec")
        spec = iss.HostSpec(plan.name, country=plan.country, locality=plan.locality,
                            organization="escort lab", org_unit=plan.region,
                            ips=(back_ips[plan.name],), policies=plan.policies)
        pki.hosts[plan.name] = (iss.issue_host(spec, key, pki.issuer_for(plan), leaf_validity), key)
    return pki


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def write_lab_files(pki: LabPKI, pki_dir: Path) -> None:
    """Write the console-side files (trust dirs, owners, host cert copies, CA keys)."""
    _write(pki_dir / "trust" / "root-ca.pem", iss.cert_pem(pki.root.cert))
    for region, ca in pki.intermediates.items():
        _write(pki_dir / "trust" / f"{region}-ca.pem", iss.cert_pem(ca.cert))
        _write(pki_dir / "private" / f"{region}-ca.key", iss.key_pem(ca.key), 0o600)
    _write(pki_dir / "private" / "root-ca.key", iss.key_pem(pki.root.key), 0o600)
    _write(pki_dir / "owners-trust" / "owners-ca.pem", iss.cert_pem(pki.owners_ca.cert))
    _write(pki_dir / "private" / "owners-ca.key", iss.key_pem(pki.owners_ca.key), 0o600)
    for owner, signer in pki.owners.items():
        _write(pki_dir / "owners" / f"{owner}.pem", iss.cert_pem(signer.cert))
        _write(pki_dir / "owners" / f"{owner}.key", iss.key_pem(signer.key), 0o600)
    # Every trusted CA publishes a (so far empty) CRL: revocation fails closed without one.
    crl_validity = iss.Validity.days(LEAF_DAYS)
    for name, ca in [("root-ca", pki.root), *((f"{r}-ca", c) for r, c in pki.intermediates.items())]:
        _write(pki_dir / "trust" / f"{name}.crl", iss.crl_pem(iss.issue_crl(ca, [], crl_validity)))
    _write(pki_dir / "owners-trust" / "owners-ca.crl",
           iss.crl_pem(iss.issue_crl(pki.owners_ca, [], crl_validity)))
    _write(pki_dir / "rogue" / "rogue-root-ca.pem", iss.cert_pem(pki.rogue_root.cert))
    _write(pki_dir / "private" / "rogue-root-ca.key", iss.key_pem(pki.rogue_root.key), 0o600)
    for host, (cert, _key) in pki.hosts.items():
        _write(pki_dir / "hosts" / f"{host}.pem", iss.cert_pem(cert))


#: RFC 7919's ffdhe2048 group (what ``openssl genpkey -genparam -algorithm DH -pkeyopt
#: dh_param:ffdhe2048`` prints: public, fixed). Without a ``dh-params.pem`` QEMU 7.2 generates
#: fresh DH parameters each time it loads server TLS credentials — for every incoming TLS
#: migration: 0.5-2.9 s of the destination's CPU measured in the lab (docs/MIGRATION.md).
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def install_host(pki: LabPKI, plan: HostPlan, qemu_dir: Path) -> None:
    """Install the files QEMU expects in ``/etc/pki/qemu`` (server and client roles)."""
    cert, key = pki.hosts[plan.name]
    _write(qemu_dir / "ca-cert.pem", pki.qemu_ca_bundle(plan))
    _write(qemu_dir / "dh-params.pem", FFDHE2048_PEM.encode())
    for role in ("server", "client"):
        _write(qemu_dir / f"{role}-cert.pem", iss.cert_pem(cert))
        _write(qemu_dir / f"{role}-key.pem", iss.key_pem(key), 0o600)


def load(pki_dir: Path) -> LabPKI:
    """The lab PKI read back from ``DIR/pki`` (a process other than the one that ran ``up``).

    Host certificates are not loaded (their keys live in each host's private
    /etc/pki); everything needed to sign policies and grants or to issue more is.
    """
    from cryptography.x509 import load_pem_x509_certificate

    def issuer(cert: Path, key: Path) -> iss.Issuer:
        return iss.Issuer(load_pem_x509_certificate(cert.read_bytes()),
                          iss.load_private_key(key.read_bytes(), str(key)))

    try:
        return LabPKI(
            root=issuer(pki_dir / "trust" / "root-ca.pem", pki_dir / "private" / "root-ca.key"),
            intermediates={r: issuer(pki_dir / "trust" / f"{r}-ca.pem", pki_dir / "private" / f"{r}-ca.key")
                           for r in ("eu-central", "eu-west")},
            owners_ca=issuer(pki_dir / "owners-trust" / "owners-ca.pem",
                             pki_dir / "private" / "owners-ca.key"),
            owners={o: issuer(pki_dir / "owners" / f"{o}.pem", pki_dir / "owners" / f"{o}.key")
                    for o in ("alice", "bob")},
            rogue_root=issuer(pki_dir / "rogue" / "rogue-root-ca.pem",
                              pki_dir / "private" / "rogue-root-ca.key"),
        )
    except (OSError, ValueError) as exc:
        from console.core.errors import InputError

        raise InputError(f"{pki_dir}: lab PKI incomplete ({exc}); run `escort lab up`") from exc
