"""Issuing certificates, keys and CRLs for demo fleets, labs and owners.

Pure: everything returns ``cryptography`` objects or bytes; writing them to disk
is the adapters' job. Real organisations bring their own CA (openssl, step-ca,
Vault); these helpers exist so that the demo, the lab and the tests use the same
code path as ``escort pki``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import InputError
from .pki.model import DEFAULT_POLICY_NAMES as DEFAULT_POLICY_NAMES
from .pki.model import ESCORT_ARC as ESCORT_ARC

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


KEY_TYPES = ("ec", "rsa", "ed25519")


def make_key(kind: str = "ec") -> PrivateKey:
    """A fresh private key: ``ec`` (P-256, what QEMU is happiest with), ``rsa`` or ``ed25519``."""
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise InputError(f"unknown key type {kind!r}; use one of {', '.join(KEY_TYPES)}")


def _hash_for(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def resolve_policy_oid(name: str, names: dict[str, str] | None = None) -> x509.ObjectIdentifier:
    """``assurance:high`` or a dotted OID -> ObjectIdentifier."""
    table = DEFAULT_POLICY_NAMES if names is None else {**DEFAULT_POLICY_NAMES, **names}
    dotted = table.get(name, name)
    try:
        return x509.ObjectIdentifier(dotted)
    except ValueError as exc:
        raise InputError(f"unknown certificate policy {name!r} (not a known name or an OID)") from exc


@dataclass(frozen=True)
class Subject:
    common_name: str
    country: str | None = None
    state: str | None = None
    locality: str | None = None
    organization: str | None = None
    org_unit: str | None = None

    def to_name(self) -> x509.Name:
        attrs: list[x509.NameAttribute[str]] = []
        for oid, value in (
            (NameOID.COUNTRY_NAME, self.country),
            (NameOID.STATE_OR_PROVINCE_NAME, self.state),
            (NameOID.LOCALITY_NAME, self.locality),
            (NameOID.ORGANIZATION_NAME, self.organization),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, self.org_unit),
            (NameOID.COMMON_NAME, self.common_name),
        ):
            if value:
                attrs.append(x509.NameAttribute(oid, value))
        return x509.Name(attrs)


@dataclass(frozen=True)
class Issuer:
    cert: x509.Certificate
    key: PrivateKey


@dataclass
class Validity:
    not_before: dt.datetime
    not_after: dt.datetime

    @classmethod
    def days(cls, days: float, *, start: dt.datetime | None = None) -> Validity:
        begin = start or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        return cls(begin, begin + dt.timedelta(days=days))


@dataclass
class HostSpec:
    """What a hypervisor host's certificate says about it."""

    hostname: str
    country: str | None = None
    state: str | None = None
    locality: str | None = None  # the site / data centre
    organization: str | None = None
    org_unit: str | None = None
    dns_names: Sequence[str] = ()
    ips: Sequence[str] = ()
    policies: Sequence[str] = ()  # friendly names or dotted OIDs


@dataclass
class NameConstraints:
    permitted_dns: Sequence[str] = ()
    excluded_dns: Sequence[str] = ()
    permitted_ips: Sequence[str] = ()  # CIDR
    excluded_ips: Sequence[str] = ()

    def to_extension(self) -> x509.NameConstraints | None:
        permitted: list[x509.GeneralName] = [x509.DNSName(d) for d in self.permitted_dns]
        permitted += [x509.IPAddress(ipaddress.ip_network(n)) for n in self.permitted_ips]
        excluded: list[x509.GeneralName] = [x509.DNSName(d) for d in self.excluded_dns]
        excluded += [x509.IPAddress(ipaddress.ip_network(n)) for n in self.excluded_ips]
        if not permitted and not excluded:
            return None
        return x509.NameConstraints(permitted_subtrees=permitted or None, excluded_subtrees=excluded or None)


@dataclass
class CASpec:
    subject: Subject
    path_len: int | None = None
    name_constraints: NameConstraints = field(default_factory=NameConstraints)
    policies: Sequence[str] = ()


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _base(subject: x509.Name, key: PrivateKey, issuer_name: x509.Name, validity: Validity,
          serial: int | None) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(validity.not_before)
        .not_valid_after(validity.not_after)
        .add_extension(_ski(key), critical=False)
    )


def _policies_ext(names: Iterable[str], oid_names: dict[str, str] | None) -> x509.CertificatePolicies:
    return x509.CertificatePolicies(
        [x509.PolicyInformation(resolve_policy_oid(n, oid_names), None) for n in names]
    )


def issue_ca(spec: CASpec, key: PrivateKey, validity: Validity, *, issuer: Issuer | None = None,
             serial: int | None = None, oid_names: dict[str, str] | None = None) -> x509.Certificate:
    """A root (``issuer=None``, self-signed) or an intermediate CA certificate."""
    name = spec.subject.to_name()
    signer_key = key if issuer is None else issuer.key
    issuer_name = name if issuer is None else issuer.cert.subject
    builder = (
        _base(name, key, issuer_name, validity, serial)
        .add_extension(x509.BasicConstraints(ca=True, path_length=spec.path_len), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                          crl_sign=True, encipher_only=False, decipher_only=False),
            critical=True,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False)
    nc = spec.name_constraints.to_extension()
    if nc is not None:
        builder = builder.add_extension(nc, critical=True)
    if spec.policies:
        builder = builder.add_extension(_policies_ext(spec.policies, oid_names), critical=False)
    return builder.sign(signer_key, _hash_for(signer_key))


def issue_host(spec: HostSpec, key: PrivateKey, issuer: Issuer, validity: Validity, *,
               serial: int | None = None, oid_names: dict[str, str] | None = None) -> x509.Certificate:
    """A hypervisor host certificate, usable by QEMU as TLS server *and* client."""
    sans: list[x509.GeneralName] = [x509.DNSName(spec.hostname)]
    sans += [x509.DNSName(d) for d in spec.dns_names if d != spec.hostname]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in spec.ips]
    subject = Subject(spec.hostname, spec.country, spec.state, spec.locality,
                      spec.organization, spec.org_unit)
    builder = (
        _base(subject.to_name(), key, issuer.cert.subject, validity, serial)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # QEMU insists on a critical keyUsage with these two bits.
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                       critical=False)
    )
    if spec.policies:
        builder = builder.add_extension(_policies_ext(spec.policies, oid_names), critical=False)
    return builder.sign(issuer.key, _hash_for(issuer.key))


def issue_owner(subject: Subject, key: PrivateKey, issuer: Issuer, validity: Validity, *,
                email: str | None = None, serial: int | None = None) -> x509.Certificate:
    """A VM owner's signing certificate (signs placement policies and grants).

    End-entity, keyUsage digitalSignature (+ nonRepudiation), extendedKeyUsage
    emailProtection: the purpose escort requires of owner certificates (docs/PKI.md).
    """
    builder = (
        _base(subject.to_name(), key, issuer.cert.subject, validity, serial)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False,
                          crl_sign=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                       critical=False)
    )
    if email:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]),
                                        critical=False)
    return builder.sign(issuer.key, _hash_for(issuer.key))


def issue_crl(issuer: Issuer, revoked: Iterable[tuple[int, dt.datetime]], validity: Validity, *,
              number: int = 1) -> x509.CertificateRevocationList:
    """A CRL signed by ``issuer`` listing ``(serial, revocation date)`` pairs."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.cert.subject)
        .last_update(validity.not_before)
        .next_update(validity.not_after)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                       critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(issuer.key, _hash_for(issuer.key))


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_private_key(data: bytes, source: str) -> PrivateKey:
    """Parse a PEM private key (unencrypted); one-line InputError otherwise."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{source}: not an unencrypted PEM private key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise InputError(f"{source}: unsupported key type {type(key).__name__}")
    return key
