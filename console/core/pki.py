"""The CA tree and host certificate checks.

CONTRACT (other modules rely on these names; extend, don't rename):

* ``load_certificate(data, source)`` / ``load_crl(data, source)``: PEM or DER bytes
  -> cryptography objects, or a one-line ``InputError``.
* ``CertInfo``: a parsed certificate plus the facts the console shows.
* ``TrustStore.build(certs, crls, at=...)`` -> ``(store, problems)``: the CA tree from
  (source name, bytes) pairs. ``problems`` are per-file ``Problem``s (bad file, CRL
  from a wrong issuer, loop...) — building never raises for one bad file, but raises
  ``InputError`` when there is no usable CA at all.
* ``TrustStore.verify_host(cert, at)`` -> ``ChainResult`` listing *every* failure.
* ``TrustStore.verify_owner(cert, intermediates, at)`` -> ``ChainResult`` for owner
  signing certificates (policies and grants).
* ``host_attributes(cert, policy_names)`` -> ``HostAttributes``.

Added (also stable): ``load_certificates`` (every certificate in a PEM bundle),
``classify_pem``/``pem_blocks`` (what kind of PEM block a file holds), ``CRLInfo``,
``TrustStore.check_ca`` (the path checks of one CA), ``TrustStore.issuer_of`` and
``ChainResult.as_json``.

How the checks are done, and why not only with ``x509.verification``
----------------------------------------------------------------------
cryptography's ``PolicyBuilder`` verifier is a Web-PKI verifier: it stops at the first
error (we must report *every* failure), rejects Ed25519 CA keys (which a private PKI
may well use), takes no CRLs and knows nothing about subject attributes or policy OIDs.
So the path is walked here with cryptography's primitives
(``Certificate.verify_directly_issued_by``, ``CertificateRevocationList.is_signature_valid``)
and one small function per check. Where the verifier *does* apply (a path that passed
every one of our checks and has no Ed25519 key in it), it is run as a cross-check:
anything it still rejects (a name-constraint form we do not evaluate, a weak signature
algorithm) becomes a ``chain.verifier`` reason rather than being silently accepted.

Everything that depends only on the CA (its path to a root, its validity, path length,
keyCertSign, revocation by its parent's CRL, stale CRLs) is computed once per CA per
``at`` and cached, so checking a host costs one signature check plus dictionary lookups.
"""

from __future__ import annotations

import binascii
import datetime as dt
import ipaddress
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import InputError
from .issuance import DEFAULT_POLICY_NAMES
from .reasons import Reason

CAStatusWord = Literal["valid", "expiring", "expired", "revoked", "not yet valid", "untrusted"]
EXPIRING_DAYS = 14
#: Longest CA path we follow (leaf excluded); deeper means something is wrong.
MAX_PATH_DEPTH = 8
#: Smallest RSA modulus accepted (NIST SP 800-131A).
MIN_RSA_BITS = 2048

CertKind = Literal["host", "owner"]


@dataclass(frozen=True, slots=True)
class Problem:
    """Something wrong with one input file; shown where it belongs, never fatal."""

    source: str
    reason: Reason


@dataclass(frozen=True)
class CertInfo:
    cert: x509.Certificate
    name: str  # CN, else the RFC 4514 subject
    subject: str  # RFC 4514
    issuer: str  # RFC 4514
    serial: int
    fingerprint: str  # SHA-256, lowercase hex, no separators
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    path_len: int | None
    key_type: str  # "EC P-256", "RSA 2048", "Ed25519"
    policies: tuple[str, ...] = ()  # dotted OIDs
    name_constraints: str = ""  # human summary, "" when none
    source: str = ""  # file it came from
    ski: str = ""  # subjectKeyIdentifier, hex ("" when absent)
    aki: str = ""  # authorityKeyIdentifier keyid, hex ("" when absent)
    key_usage: tuple[str, ...] = ()  # e.g. ("digitalSignature", "keyCertSign")
    ext_key_usage: tuple[str, ...] = ()  # e.g. ("serverAuth", "clientAuth")
    constraints: str = ""  # "CA, pathLen 0" / "CA" / "not a CA"

    def days_left(self, at: dt.datetime) -> int:
        return (self.not_after - at).days

    @property
    def fingerprint_sha1(self) -> str:
        """SHA-1 fingerprint (lowercase hex), for display next to tools that still show it.

        A property, not a field: host checks build a CertInfo per leaf and never need it.
        """
        return self.cert.fingerprint(hashes.SHA1()).hex()

    @property
    def self_issued(self) -> bool:
        return self.cert.subject == self.cert.issuer


@dataclass(frozen=True)
class CRLInfo:
    """A CRL accepted into the store, its revoked serials indexed once.

    ``get_revoked_certificate_by_serial_number`` is a linear scan; with thousands of
    hosts checked against one CRL that adds up, so serials go into a dict here.
    """

    crl: x509.CertificateRevocationList
    source: str
    issuer: str
    last_update: dt.datetime
    next_update: dt.datetime | None
    number: int | None
    revoked: Mapping[int, dt.datetime]  # serial -> revocation date

    def is_stale(self, at: dt.datetime) -> bool:
        return self.next_update is not None and self.next_update < at

    def revoked_at(self, serial: int, at: dt.datetime) -> dt.datetime | None:
        """The revocation date if ``serial`` is revoked as of ``at``, else None."""
        when = self.revoked.get(serial)
        if when is None or when > at:
            return None
        return when

    def reason_for(self, serial: int) -> str:
        """The CRL reason code (slow path, only used when reporting)."""
        entry = self.crl.get_revoked_certificate_by_serial_number(serial)
        if entry is None:
            return ""
        try:
            ext = entry.extensions.get_extension_for_class(x509.CRLReason)
        except (x509.ExtensionNotFound, ValueError):
            return ""
        return str(ext.value.reason.value)


@dataclass(eq=False)
class CANode:
    info: CertInfo
    parent: CANode | None = None
    children: list[CANode] = field(default_factory=list)
    revoked: bool = False  # revoked by its parent's CRL
    revocation_reason: str = ""
    crl_stale: bool = False  # this CA's own CRL is past nextUpdate
    anchor: bool = False  # self-signed CA: a trust anchor
    issuers: list[CANode] = field(default_factory=list)  # every node whose key signed this cert
    crl: CRLInfo | None = None  # this CA's own (newest accepted) CRL
    untrusted: Reason | None = None  # why no path to an anchor exists (loop, missing root)

    def status(self, at: dt.datetime) -> CAStatusWord:
        """One word for the CA tree view; ``revoked`` reflects the build-time CRLs."""
        at = utc(at)
        if self.revoked:
            return "revoked"
        if self.untrusted is not None:
            return "untrusted"
        if at < self.info.not_before:
            return "not yet valid"
        if at > self.info.not_after:
            return "expired"
        if self.info.not_after - at <= dt.timedelta(days=EXPIRING_DAYS):
            return "expiring"
        return "valid"

    def path_to_root(self) -> list[CANode]:
        """This node, its parent, ... up to the anchor (or as far as the tree goes)."""
        out: list[CANode] = []
        seen: set[int] = set()
        node: CANode | None = self
        while node is not None and id(node) not in seen:
            seen.add(id(node))
            out.append(node)
            node = node.parent
        return out


@dataclass(frozen=True)
class ChainResult:
    valid: bool
    reasons: tuple[Reason, ...]  # every failing check (severity "error")
    warnings: tuple[Reason, ...] = ()  # e.g. stale CRL
    chain: tuple[CertInfo, ...] = ()  # leaf first, anchor last (as far as it could be built)
    ca_fingerprints: frozenset[str] = frozenset()  # every CA in the path, for policy matching
    leaf: CertInfo | None = None
    ca_names: tuple[str, ...] = ()  # names of the CAs in the path, issuer first

    def as_json(self) -> dict[str, object]:
        """The ``escort cert verify --json`` shape (a stable contract)."""
        return {
            "valid": self.valid,
            "reasons": [r.as_json() for r in self.reasons],
            "chain": [c.subject for c in self.chain],
            "warnings": [r.as_json() for r in self.warnings],
        }


@dataclass(frozen=True)
class HostAttributes:
    common_name: str
    country: str | None
    state: str | None
    locality: str | None
    organization: str | None
    org_unit: str | None
    dns_names: tuple[str, ...]
    ips: tuple[str, ...]
    policies: frozenset[str]  # friendly names where known, else dotted OIDs
    not_after: dt.datetime

    def days_to_expiry(self, at: dt.datetime) -> int:
        return (self.not_after - at).days


# --------------------------------------------------------------------------- parsing

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)-----END ([A-Z0-9 ]+)-----", re.S)
_PEM_BEGIN = re.compile(rb"-----BEGIN ")

PemKind = Literal["certificate", "crl", "private key", "public key", "certificate request",
                  "other"]


def utc(at: dt.datetime) -> dt.datetime:
    """Aware UTC datetime (a naive one is taken to be UTC already)."""
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def _label_kind(label: str) -> PemKind:
    if label in ("CERTIFICATE", "X509 CERTIFICATE"):
        return "certificate"
    if label == "X509 CRL":
        return "crl"
    if label.endswith("PRIVATE KEY"):
        return "private key"
    if label.endswith("PUBLIC KEY"):
        return "public key"
    if label.endswith("CERTIFICATE REQUEST"):
        return "certificate request"
    return "other"


def pem_blocks(data: bytes, source: str) -> list[tuple[PemKind, str, bytes]]:
    """Every PEM block in ``data`` as (kind, label, whole block), or an InputError.

    Returns ``[]`` for data without any ``-----BEGIN`` line (DER or garbage).
    """
    if not _PEM_BEGIN.search(data):
        return []
    blocks: list[tuple[PemKind, str, bytes]] = []
    for m in _PEM_BLOCK.finditer(data):
        begin, end = m.group(1).decode(), m.group(3).decode()
        if begin != end:
            raise InputError(f"{source}: malformed PEM (BEGIN {begin} closed by END {end})")
        body = re.sub(rb"\s+", b"", m.group(2))
        if b":" in m.group(2):  # RFC 1421 headers (encrypted keys): nothing we read
            kind = _label_kind(begin)
            blocks.append((kind, begin, m.group(0)))
            continue
        try:
            binascii.a2b_base64(body, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{source}: malformed PEM ({begin} block is not valid base64)") from exc
        blocks.append((_label_kind(begin), begin, m.group(0)))
    if not blocks:
        raise InputError(f"{source}: malformed PEM (BEGIN line without a matching END line)")
    return blocks


def classify_pem(data: bytes, source: str) -> set[PemKind]:
    """The kinds of PEM block in ``data`` (empty set when it is not PEM at all)."""
    return {kind for kind, _, _ in pem_blocks(data, source)}


_WRONG_KIND = {
    "crl": "is a CRL",
    "private key": "contains a private key (keep keys out of trust directories)",
    "public key": "is a bare public key",
    "certificate request": "is a certificate request (CSR), not a signed certificate",
    "certificate": "is a certificate",
}


def _der_kind(data: bytes) -> PemKind | None:
    """Which kind of DER object ``data`` is, by trying the parsers in turn."""
    parsers: tuple[tuple[PemKind, Callable[[bytes], object]], ...] = (
        ("certificate", x509.load_der_x509_certificate),
        ("crl", x509.load_der_x509_crl),
        ("certificate request", x509.load_der_x509_csr),
    )
    for kind, parse in parsers:
        try:
            parse(data)
        except (ValueError, TypeError):
            continue
        return kind
    try:
        serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        pass
    else:
        return "private key"
    return None


def _check_extensions(cert: x509.Certificate, source: str) -> None:
    """Read every field once, so a damaged certificate fails at the door.

    cryptography parses names, extensions and keys lazily: a damaged certificate can
    load fine and raise ValueError/InvalidVersion later, deep inside a check.
    """
    try:
        _ = cert.extensions
    except ValueError as exc:
        raise InputError(f"{source}: certificate has a malformed extension ({exc})") from exc
    try:
        _ = (cert.subject, cert.issuer, cert.serial_number, cert.public_key(),
             cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm)
    except UnsupportedAlgorithm:
        pass  # reported by the checks as key.unsupported / chain.signature, with context
    except Exception as exc:  # ValueError, InvalidVersion...: damage of any kind
        raise InputError(f"{source}: damaged certificate ({exc})") from exc


def load_certificates(data: bytes, source: str, *, require_pem: bool = False) -> list[x509.Certificate]:
    """Every certificate in ``data`` (a PEM bundle or one DER certificate).

    Anything else (a CRL, a key, a CSR, malformed PEM, binary noise) is a one-line
    InputError naming ``source``. ``require_pem`` refuses DER, for files that tools
    such as QEMU read and which must therefore be PEM.
    """
    if not data.strip():
        raise InputError(f"{source}: empty file, expected a certificate")
    blocks = pem_blocks(data, source)
    if blocks:
        certs: list[x509.Certificate] = []
        for kind, label, block in blocks:
            if kind != "certificate":
                continue
            try:
                cert = x509.load_pem_x509_certificate(block)
            except ValueError as exc:
                raise InputError(f"{source}: malformed PEM ({label} block is not a valid "
                                 "X.509 certificate)") from exc
            _check_extensions(cert, source)
            certs.append(cert)
        if not certs:
            kind = blocks[0][0]
            what = _WRONG_KIND.get(kind, f"holds a {blocks[0][1]} block")
            raise InputError(f"{source}: {what}, expected a certificate")
        return certs
    der = _der_kind(data)
    if der == "certificate":
        if require_pem:
            raise InputError(f"{source}: DER (binary) data where PEM was expected; convert it with "
                             f"openssl x509 -inform der -in {source} -out {source}.pem")
        cert = x509.load_der_x509_certificate(data)
        _check_extensions(cert, source)
        return [cert]
    if der is not None:
        raise InputError(f"{source}: {_WRONG_KIND[der]} (DER), expected a certificate")
    raise InputError(f"{source}: not a certificate (neither PEM nor DER)")


def load_certificate(data: bytes, source: str, *, require_pem: bool = False) -> x509.Certificate:
    """The first certificate in ``data``; see ``load_certificates``."""
    return load_certificates(data, source, require_pem=require_pem)[0]


def load_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    """One CRL, PEM or DER, or a one-line InputError naming ``source``."""
    if not data.strip():
        raise InputError(f"{source}: empty file, expected a CRL")
    blocks = pem_blocks(data, source)
    if blocks:
        crls = [b for b in blocks if b[0] == "crl"]
        if not crls:
            kind = blocks[0][0]
            what = _WRONG_KIND.get(kind, f"holds a {blocks[0][1]} block")
            raise InputError(f"{source}: {what}, expected a CRL")
        try:
            return x509.load_pem_x509_crl(crls[0][2])
        except ValueError as exc:
            raise InputError(f"{source}: malformed PEM (X509 CRL block is not a valid CRL)") from exc
    der = _der_kind(data)
    if der == "crl":
        return x509.load_der_x509_crl(data)
    if der is not None:
        raise InputError(f"{source}: {_WRONG_KIND[der]} (DER), expected a CRL")
    raise InputError(f"{source}: not a CRL (neither PEM nor DER)")


# --------------------------------------------------------------------------- facts

_E = TypeVar("_E", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, cls: type[_E]) -> _E | None:
    """The certificate's extension of type ``cls``, or None when it has none."""
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _basic(cert: x509.Certificate) -> x509.BasicConstraints | None:
    return _ext(cert, x509.BasicConstraints)


def _key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    return _ext(cert, x509.KeyUsage)


def _eku(cert: x509.Certificate) -> x509.ExtendedKeyUsage | None:
    return _ext(cert, x509.ExtendedKeyUsage)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    return _ext(cert, x509.SubjectAlternativeName)


def _name_constraints(cert: x509.Certificate) -> x509.NameConstraints | None:
    return _ext(cert, x509.NameConstraints)


def _ski(cert: x509.Certificate) -> bytes | None:
    value = _ext(cert, x509.SubjectKeyIdentifier)
    return value.digest if value is not None else None


def _aki(cert: x509.Certificate) -> bytes | None:
    value = _ext(cert, x509.AuthorityKeyIdentifier)
    return value.key_identifier if value is not None else None


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def key_type(cert: x509.Certificate) -> str:
    """"EC P-256", "RSA 2048", "Ed25519"... for display and the key checks."""
    try:
        key = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return f"unsupported ({cert.public_key_algorithm_oid.dotted_string})"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {_CURVES.get(key.curve.name, key.curve.name)}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size}"
    return type(key).__name__


_WEAK_HASHES = ("md5", "sha1")


def _weak_signature(cert: x509.Certificate, who: str) -> Reason | None:
    """SHA-1/MD5 signatures are forgeable; the Web-PKI verifier refuses them and so do we."""
    try:
        algo = cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        algo = None
        name = cert.signature_algorithm_oid.dotted_string
    else:
        name = algo.name if algo is not None else ""
    if algo is None and name == "":
        return None  # Ed25519/Ed448: the hash is part of the algorithm
    if algo is not None and name not in _WEAK_HASHES:
        return None
    return Reason("chain.weak_signature", f"{who} is signed with a weak or unknown algorithm ({name}).",
                  "Reissue it with a SHA-256 (or stronger) signature.")


def _key_problem(cert: x509.Certificate, who: str) -> Reason | None:
    """RSA (>= 2048 bits), ECDSA and Ed25519 are supported; anything else is refused."""
    kind = key_type(cert)
    if kind.startswith("RSA "):
        bits = int(kind.split()[1])
        if bits < MIN_RSA_BITS:
            return Reason("key.weak", f"{who} has a {bits}-bit RSA key, below {MIN_RSA_BITS} bits.",
                          f"Reissue it with an RSA key of at least {MIN_RSA_BITS} bits or an EC key.")
        return None
    if kind.startswith("EC ") or kind == "Ed25519":
        return None
    return Reason("key.unsupported", f"{who} has a {kind} key; escort supports RSA, ECDSA and Ed25519.",
                  "Reissue it with an RSA, ECDSA (P-256/P-384) or Ed25519 key.")


_KU_BITS = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
            "key_agreement", "key_cert_sign", "crl_sign")
_KU_NAMES = ("digitalSignature", "nonRepudiation", "keyEncipherment", "dataEncipherment",
             "keyAgreement", "keyCertSign", "cRLSign")
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
    ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE: "anyExtendedKeyUsage",
}


def _gn_text(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"DirName:{name.value.rfc4514_string()}"
    return type(name).__name__


def _nc_summary(nc: x509.NameConstraints | None) -> str:
    if nc is None:
        return ""
    parts = []
    if nc.permitted_subtrees:
        parts.append("permit " + ", ".join(_gn_text(n) for n in nc.permitted_subtrees))
    if nc.excluded_subtrees:
        parts.append("exclude " + ", ".join(_gn_text(n) for n in nc.excluded_subtrees))
    return "; ".join(parts)


def _common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def cert_info(cert: x509.Certificate, source: str = "") -> CertInfo:
    """The facts escort shows about a certificate; InputError for unparseable extensions."""
    try:
        basic = _basic(cert)
        ku = _key_usage(cert)
        eku = _eku(cert)
        nc = _name_constraints(cert)
        pol = _ext(cert, x509.CertificatePolicies)
        ski, aki = _ski(cert), _aki(cert)
    except ValueError as exc:
        raise InputError(f"{source or 'certificate'}: malformed extension ({exc})") from exc
    subject = cert.subject.rfc4514_string()
    is_ca = bool(basic and basic.ca)
    path_len = basic.path_length if basic and basic.ca else None
    ku_names: tuple[str, ...] = ()
    if ku is not None:
        ku_names = tuple(n for bit, n in zip(_KU_BITS, _KU_NAMES, strict=True) if getattr(ku, bit))
    constraints = "not a CA" if not is_ca else ("CA" if path_len is None else f"CA, pathLen {path_len}")
    return CertInfo(
        cert=cert,
        name=_common_name(cert.subject) or subject,
        subject=subject,
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        path_len=path_len,
        key_type=key_type(cert),
        policies=tuple(p.policy_identifier.dotted_string for p in pol)
        if isinstance(pol, x509.CertificatePolicies) else (),
        name_constraints=_nc_summary(nc),
        source=source,
        ski=ski.hex() if ski else "",
        aki=aki.hex() if aki else "",
        key_usage=ku_names,
        ext_key_usage=tuple(_EKU_NAMES.get(o, o.dotted_string) for o in eku) if eku else (),
        constraints=constraints,
    )


def host_attributes(cert: x509.Certificate, policy_names: Mapping[str, str] | None = None) -> HostAttributes:
    """What a host certificate says about the host, for placement policies.

    ``policy_names`` maps friendly names to dotted OIDs (the fleet file's table, same
    direction as ``issuance.DEFAULT_POLICY_NAMES``, which it extends and overrides).
    """
    table = {**DEFAULT_POLICY_NAMES, **(policy_names or {})}
    by_oid = {oid: name for name, oid in table.items()}

    def first(oid: x509.ObjectIdentifier) -> str | None:
        attrs = cert.subject.get_attributes_for_oid(oid)
        return str(attrs[0].value) if attrs else None

    try:
        san = _san(cert)
        pol = _ext(cert, x509.CertificatePolicies)
    except ValueError as exc:
        raise InputError(f"certificate {cert.subject.rfc4514_string()}: malformed extension") from exc
    dns = tuple(san.get_values_for_type(x509.DNSName)) if san else ()
    ips = tuple(str(i) for i in san.get_values_for_type(x509.IPAddress)) if san else ()
    oids = ([p.policy_identifier.dotted_string for p in pol]
            if isinstance(pol, x509.CertificatePolicies) else [])
    return HostAttributes(
        common_name=first(NameOID.COMMON_NAME) or cert.subject.rfc4514_string(),
        country=first(NameOID.COUNTRY_NAME),
        state=first(NameOID.STATE_OR_PROVINCE_NAME),
        locality=first(NameOID.LOCALITY_NAME),
        organization=first(NameOID.ORGANIZATION_NAME),
        org_unit=first(NameOID.ORGANIZATIONAL_UNIT_NAME),
        dns_names=dns,
        ips=ips,
        policies=frozenset(by_oid.get(o, o) for o in oids),
        not_after=cert.not_valid_after_utc,
    )


# --------------------------------------------------------------------------- checks

def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Did ``issuer``'s key sign ``cert``? (name match is checked by the caller too)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _aki_matches(cert: x509.Certificate, issuer_info: CertInfo, cert_aki: str | None = None) -> bool:
    aki = cert_aki if cert_aki is not None else (_aki(cert) or b"").hex()
    return not aki or not issuer_info.ski or aki == issuer_info.ski


def _dns_matches(name: str, constraint: str) -> bool:
    """RFC 5280 4.2.1.10 DNS subtree match (case-insensitive, label-aligned)."""
    name, constraint = name.lower().rstrip("."), constraint.lower().rstrip(".")
    if not constraint:
        return True
    if constraint.startswith("."):
        return name.endswith(constraint)
    return name == constraint or name.endswith("." + constraint)


def _general_name_matches(name: x509.GeneralName, subtree: x509.GeneralName) -> bool | None:
    """True/False when ``subtree`` constrains names of ``name``'s type, None otherwise."""
    if isinstance(name, x509.DNSName) and isinstance(subtree, x509.DNSName):
        return _dns_matches(name.value, subtree.value)
    if isinstance(name, x509.IPAddress) and isinstance(subtree, x509.IPAddress):
        net = subtree.value
        addr = name.value
        if isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network) and isinstance(
                addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return addr.version == net.version and addr in net
        return False
    if isinstance(name, x509.DirectoryName) and isinstance(subtree, x509.DirectoryName):
        want = list(subtree.value.rdns)
        return list(name.value.rdns)[: len(want)] == want
    return None


def _name_constraint_failures(cert: x509.Certificate, ca: CertInfo,
                              nc: x509.NameConstraints, leaf_name: str) -> list[Reason]:
    """Check a certificate's SAN DNS/IP names and subject DN against one CA's constraints.

    Email and URI subtrees are not evaluated here; the ``x509.verification`` cross-check
    covers what it supports.
    """
    san = _san(cert)
    names: list[x509.GeneralName] = list(san) if san else []
    if len(cert.subject):
        names.append(x509.DirectoryName(cert.subject))
    out: list[Reason] = []
    for name in names:
        for sub in nc.excluded_subtrees or ():
            if _general_name_matches(name, sub):
                out.append(Reason(
                    "name.constraints",
                    f"{leaf_name}'s name {_gn_text(name)} is excluded by {ca.name}'s name constraints "
                    f"({_gn_text(sub)}).",
                    f"Issue the certificate without {_gn_text(name)}, or from a CA allowed to "
                    "issue that name."))
        permitted = nc.permitted_subtrees or []
        relevant = [m for m in (_general_name_matches(name, sub) for sub in permitted) if m is not None]
        if relevant and not any(relevant):  # constrained type, but no permitted subtree matches
            out.append(Reason(
                "name.constraints",
                f"{leaf_name}'s name {_gn_text(name)} is outside {ca.name}'s permitted names "
                f"({', '.join(_gn_text(s) for s in permitted)}).",
                f"Issue the certificate with names inside {ca.name}'s permitted subtrees."))
    return out


@dataclass(frozen=True)
class _PathResult:
    """Cached checks of one CA's path up to its anchor, for one ``at`` and offset."""

    path: tuple[CANode, ...]  # the CA first, anchor last
    errors: tuple[Reason, ...]
    warnings: tuple[Reason, ...]
    constraints: tuple[tuple[CertInfo, x509.NameConstraints], ...]
    fingerprints: frozenset[str]
    names: tuple[str, ...]
    cross_checkable: bool  # no Ed25519/Ed448 key on the path: the verifier applies


def _validity_reasons(info: CertInfo, at: dt.datetime, code_prefix: str, who: str) -> list[Reason]:
    if at < info.not_before:
        return [Reason(f"{code_prefix}.not_yet_valid",
                       f"{who} {info.name} is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC.",
                       "Wait until it becomes valid, or check the clocks of the machines involved.")]
    if at > info.not_after:
        return [Reason(f"{code_prefix}.expired",
                       f"{who} {info.name} expired on {info.not_after:%Y-%m-%d %H:%M} UTC.",
                       "Renew the certificate." if code_prefix == "cert"
                       else f"Renew the CA certificate of {info.name} and put it in the trust directory.")]
    return []


def _crl_stale_warning(node: CANode, at: dt.datetime) -> Reason | None:
    crl = node.crl
    if crl is None or not crl.is_stale(at) or crl.next_update is None:
        return None
    return Reason(
        "crl.stale",
        f"The CRL of {node.info.name} ({crl.source}) was due for renewal on "
        f"{crl.next_update:%Y-%m-%d %H:%M} UTC; revocations since then are unknown.",
        f"Fetch a current CRL from {node.info.name} into the trust directory.",
        severity="warning",
    )


class TrustStore:
    """The CA tree of one trust directory, with cached per-CA path checks."""

    anchors: list[CANode]

    def __init__(self, nodes: list[CANode], *, at: dt.datetime, crls: Sequence[CRLInfo] = (),
                 problems: Sequence[Problem] = (), cross_check: bool = False) -> None:
        self._nodes = nodes
        self.anchors = [n for n in nodes if n.anchor]
        self.at = at
        self.crls = list(crls)
        self.problems = list(problems)
        #: Run cryptography's verifier over paths our checks passed (see ``build``).
        self.cross_check = cross_check
        self._by_subject: dict[x509.Name, list[CANode]] = {}
        self._by_fp: dict[str, CANode] = {}
        for n in nodes:
            self._by_subject.setdefault(n.info.cert.subject, []).append(n)
            self._by_fp[n.info.fingerprint] = n
        # Caches are filled from UI/service worker threads too: lookups are plain dict
        # reads, eviction happens under this lock (a duplicate computation is harmless).
        self._lock = threading.Lock()
        self._cache: dict[dt.datetime, dict[tuple[int, int], _PathResult]] = {}
        self._verifiers: dict[tuple[int, dt.datetime], xv.ClientVerifier] = {}
        #: (leaf fingerprint, issuer node id) -> signature verified. Signatures do not
        #: depend on time, so a console refreshing 1,000 hosts pays for them once.
        self._signatures: dict[tuple[str, int], bool] = {}

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        certs: Iterable[tuple[str, bytes]],
        crls: Iterable[tuple[str, bytes]] = (),
        *,
        at: dt.datetime,
        cross_check: bool = False,
    ) -> tuple[TrustStore, list[Problem]]:
        """Parse, link and check a trust directory's contents; see the module docstring.

        ``cross_check=True`` also runs cryptography's verifier over every leaf whose
        path passed our checks. It roughly triples the cost of a host check (~0.25 ms ->
        ~0.8 ms here), so fleet-wide checks leave it off and ``escort cert verify`` turns
        it on; the unit tests compare both verdicts over many generated chains.
        """
        at = utc(at)
        problems: list[Problem] = []
        nodes: list[CANode] = []
        seen: set[str] = set()
        for source, data in certs:
            try:
                parsed = load_certificates(data, source)
            except InputError as exc:
                problems.append(Problem(source, Reason(
                    "file.invalid", str(exc), "Remove the file or replace it with a CA certificate.")))
                continue
            for i, cert in enumerate(parsed):
                where = source if len(parsed) == 1 else f"{source}[{i + 1}]"
                try:
                    info = cert_info(cert, where)
                except InputError as exc:
                    problems.append(Problem(where, Reason("file.invalid", str(exc), "Remove the file.")))
                    continue
                if info.fingerprint in seen:
                    continue
                seen.add(info.fingerprint)
                nodes.append(CANode(info))
        cas = [n for n in nodes if n.info.is_ca]
        if not cas:
            raise InputError("no CA certificates in the trust directory"
                             + (f" ({len(nodes)} non-CA certificate(s) found)" if nodes else ""))
        for n in nodes:
            if not n.info.is_ca:
                problems.append(Problem(n.info.source, Reason(
                    "trust.not_ca",
                    f"{n.info.name} is not a CA certificate (basicConstraints CA is not set).",
                    "Keep only CA certificates and CRLs in the trust directory.",
                    severity="warning")))
        _link(nodes, problems)
        crl_infos = _attach_crls(nodes, crls, at, problems)
        for n in nodes:
            for parent in n.issuers:
                if parent.crl is not None and parent.crl.revoked_at(n.info.serial, at) is not None:
                    n.revoked = True
                    n.revocation_reason = parent.crl.reason_for(n.info.serial)
            n.crl_stale = n.crl is not None and n.crl.is_stale(at)
        store = cls(nodes, at=at, crls=crl_infos, problems=problems, cross_check=cross_check)
        return store, problems

    # ---------------------------------------------------------------- queries
    def nodes(self) -> list[CANode]:
        return list(self._nodes)

    def by_fingerprint(self, fingerprint: str) -> CANode | None:
        return self._by_fp.get(fingerprint.lower().replace(":", ""))

    def issuer_of(self, cert: x509.Certificate) -> CANode | None:
        """The CA in this store that signed ``cert`` (the tree's "hangs under")."""
        aki = (_aki(cert) or b"").hex()
        for node in self._by_subject.get(cert.issuer, ()):
            if _aki_matches(cert, node.info, aki) and _signed_by(cert, node.info.cert):
                return node
        return None

    def check_ca(self, node: CANode, at: dt.datetime) -> ChainResult:
        """The path checks of one CA (for the trust view): valid, reasons, chain."""
        at = utc(at)
        res = self._path(node, at, 0)
        errors = res.errors  # the path starts at ``node``: its own checks are included
        return ChainResult(valid=not errors, reasons=errors,
                           warnings=res.warnings, chain=tuple(n.info for n in res.path),
                           ca_fingerprints=res.fingerprints, leaf=node.info, ca_names=res.names)

    # ---------------------------------------------------------------- path cache
    def _path(self, node: CANode, at: dt.datetime, offset: int) -> _PathResult:
        per_at = self._cache.get(at)
        if per_at is None:
            with self._lock:
                if len(self._cache) >= 8:  # callers passing "now" each time must not grow this forever
                    self._cache.pop(next(iter(self._cache)), None)
                per_at = self._cache.setdefault(at, {})
        key = (id(node), offset)
        hit = per_at.get(key)
        if hit is None:
            hit = per_at[key] = self._compute_path(node, at, offset)
        return hit

    def _compute_path(self, node: CANode, at: dt.datetime, offset: int) -> _PathResult:
        path = node.path_to_root()
        errors: list[Reason] = []
        warnings: list[Reason] = []
        constraints: list[tuple[CertInfo, x509.NameConstraints]] = []
        below = offset  # non-self-issued intermediates between the leaf and this CA
        cross_checkable = True
        for i, n in enumerate(path):
            info = n.info
            errors += _validity_reasons(info, at, "ca", "CA")
            if not info.is_ca:
                errors.append(Reason("ca.not_ca", f"{info.name} issued a certificate but is not a CA "
                                     "(basicConstraints CA is not set).",
                                     f"Reissue {info.name} as a CA certificate."))
            if info.path_len is not None and below > info.path_len:
                errors.append(Reason("ca.path_len", f"{info.name} allows {info.path_len} intermediate "
                                     f"CA(s) below it (pathLen), this path has {below}.",
                                     f"Issue the certificate from a CA closer to {info.name}, or reissue "
                                     f"{info.name} with a larger pathLen."))
            ku = _key_usage(info.cert)
            if ku is not None and not ku.key_cert_sign:
                errors.append(Reason("ca.no_keycertsign", f"{info.name}'s keyUsage lacks keyCertSign, "
                                     "so it may not sign certificates.",
                                     f"Reissue {info.name} with keyUsage keyCertSign."))
            kp = _key_problem(info.cert, f"CA {info.name}")
            if kp is not None:
                errors.append(kp)
            if not n.anchor:  # an anchor's self-signature carries no trust
                weak = _weak_signature(info.cert, f"CA {info.name}")
                if weak is not None:
                    errors.append(weak)
            if info.key_type in ("Ed25519", "Ed448"):
                cross_checkable = False
            nc = _name_constraints(info.cert)
            if nc is not None:
                constraints.append((info, nc))
                # RFC 5280 6.1.4(b): the constraints also bind the CAs below it on this
                # path (except self-issued ones); the leaf is checked per certificate.
                for lower in path[:i]:
                    if not lower.info.self_issued:
                        errors += _name_constraint_failures(lower.info.cert, info, nc, lower.info.name)
            if i + 1 < len(path):
                parent = path[i + 1]
                when = parent.crl.revoked_at(info.serial, at) if parent.crl else None
                if when is not None:
                    errors.append(Reason("ca.revoked", f"CA {info.name} was revoked by {parent.info.name} "
                                         f"on {when:%Y-%m-%d}.",
                                         "Use a CA that is not revoked, or reissue it from "
                                         f"{parent.info.name}."))
            stale = _crl_stale_warning(n, at)
            if stale is not None:
                warnings.append(stale)
            if not info.self_issued:
                below += 1
        top = path[-1]
        if not top.anchor:
            why = top.untrusted
            errors.append(Reason(
                "chain.no_anchor",
                why.message if why else f"{top.info.name} does not lead to a self-signed root "
                                        "in the trust directory.",
                why.fix if why else "Add the root CA certificate to the trust directory."))
        return _PathResult(path=tuple(path), errors=tuple(errors), warnings=tuple(warnings),
                           constraints=tuple(constraints),
                           fingerprints=frozenset(n.info.fingerprint for n in path),
                           names=tuple(n.info.name for n in path), cross_checkable=cross_checkable)

    # ---------------------------------------------------------------- leaf checks
    def verify_host(self, cert: x509.Certificate, at: dt.datetime, *,
                    intermediates: Iterable[x509.Certificate] = ()) -> ChainResult:
        """Every check a hypervisor host certificate must pass at ``at``.

        ``intermediates`` (e.g. the rest of a full-chain file) may fill gaps between the
        host certificate and the trust directory; they are checked like the stored CAs.
        """
        return self._verify(cert, list(intermediates), utc(at), "host")

    def verify_owner(
        self, cert: x509.Certificate, intermediates: Iterable[x509.Certificate], at: dt.datetime
    ) -> ChainResult:
        """Chain an owner's signing certificate (from a JWS x5c) to this store's anchors.

        Same checks as hosts, but the leaf needs keyUsage digitalSignature only (no
        serverAuth/clientAuth) and ``intermediates`` (the rest of x5c) may fill gaps.
        """
        return self._verify(cert, list(intermediates), utc(at), "owner")

    def _verify(self, cert: x509.Certificate, extras: list[x509.Certificate], at: dt.datetime,
                kind: CertKind) -> ChainResult:
        try:
            leaf = cert_info(cert)
        except InputError as exc:
            return ChainResult(False, (Reason("cert.malformed", str(exc), "Reissue the certificate."),))
        who = "Host certificate" if kind == "host" else "Owner certificate"
        errors: list[Reason] = []
        warnings: list[Reason] = []
        errors += _validity_reasons(leaf, at, "cert", who)
        for problem in (_key_problem(cert, f"{who} {leaf.name}"),
                        _weak_signature(cert, f"{who} {leaf.name}")):
            if problem is not None:
                errors.append(problem)
        errors += _usage_reasons(cert, leaf, kind)

        # Walk up: extra intermediates only where the store has no signer.
        extra_infos: list[CertInfo] = []
        current, current_info = cert, leaf
        issuer_node: CANode | None = None
        unused = list(extras)
        for _ in range(MAX_PATH_DEPTH):
            found = self._best_issuer(current, current_info, at, len(extra_infos))
            if isinstance(found, CANode):
                issuer_node = found
                break
            nxt = next((e for e in unused if e.subject == current.issuer and _signed_by(current, e)), None)
            if nxt is None:
                errors.append(found)
                break
            unused.remove(nxt)
            try:
                nxt_info = cert_info(nxt, "x5c/intermediate")
            except InputError as exc:
                errors.append(Reason("cert.malformed", str(exc), "Fix the intermediate certificates."))
                break
            extra_infos.append(nxt_info)
            current, current_info = nxt, nxt_info
        else:
            errors.append(Reason("chain.too_long", f"the path from {leaf.name} is longer than "
                                 f"{MAX_PATH_DEPTH} certificates.", "Use a shorter CA hierarchy."))

        # Checks of the extra intermediates (not cached: they are not in the store).
        for j, info in enumerate(extra_infos):
            errors += _validity_reasons(info, at, "ca", "CA")
            if not info.is_ca:
                errors.append(Reason("ca.not_ca", f"{info.name} issued a certificate but is not a CA.",
                                     f"Reissue {info.name} as a CA certificate."))
            if info.path_len is not None and j > info.path_len:
                errors.append(Reason("ca.path_len", f"{info.name} allows {info.path_len} intermediate "
                                     f"CA(s) below it (pathLen), this path has {j}.",
                                     "Shorten the path or reissue with a larger pathLen."))
            ku = _key_usage(info.cert)
            if ku is not None and not ku.key_cert_sign:
                errors.append(Reason("ca.no_keycertsign", f"{info.name}'s keyUsage lacks keyCertSign.",
                                     f"Reissue {info.name} with keyUsage keyCertSign."))
            for problem in (_key_problem(info.cert, f"CA {info.name}"),
                            _weak_signature(info.cert, f"CA {info.name}")):
                if problem is not None:
                    errors.append(problem)

        chain: list[CertInfo] = [leaf, *extra_infos]
        fingerprints: frozenset[str] = frozenset(i.fingerprint for i in extra_infos)
        names: tuple[str, ...] = tuple(i.name for i in extra_infos)
        constraints: list[tuple[CertInfo, x509.NameConstraints]] = [
            (i, nc) for i in extra_infos if (nc := _name_constraints(i.cert)) is not None]
        cross_checkable = leaf.key_type not in ("Ed25519", "Ed448")
        path: tuple[CANode, ...] = ()
        if issuer_node is not None:
            res = self._path(issuer_node, at, len(extra_infos))
            path = res.path
            errors += res.errors
            warnings += res.warnings
            chain += [n.info for n in res.path]
            fingerprints |= res.fingerprints
            names += res.names
            constraints += res.constraints
            cross_checkable = cross_checkable and res.cross_checkable
            # Revocation: the leaf (or the lowest extra intermediate) by the issuer's CRL.
            below = extra_infos[-1] if extra_infos else leaf
            when = issuer_node.crl.revoked_at(below.serial, at) if issuer_node.crl else None
            if when is not None:
                code = "cert.revoked" if below is leaf else "ca.revoked"
                errors.append(Reason(code, f"{below.name} was revoked by {issuer_node.info.name} on "
                                     f"{when:%Y-%m-%d}.",
                                     "Issue a new certificate; a revoked one cannot be reinstated."))
        for ca, nc in constraints:
            errors += _name_constraint_failures(cert, ca, nc, leaf.name)

        errors = list(dict.fromkeys(errors))
        if (not errors and self.cross_check and cross_checkable and path and path[-1].anchor
                and not any(i.key_type in ("Ed25519", "Ed448") for i in extra_infos)):
            problem = self._cross_check(cert, [i.cert for i in extra_infos] + [n.info.cert for n in path],
                                        at)
            if problem is not None:
                errors.append(problem)
        return ChainResult(valid=not errors, reasons=tuple(errors), warnings=tuple(warnings),
                           chain=tuple(chain), ca_fingerprints=fingerprints, leaf=leaf, ca_names=names)

    def _signed_by_node(self, cert: x509.Certificate, info: CertInfo, node: CANode) -> bool:
        key = (info.fingerprint, id(node))
        ok = self._signatures.get(key)
        if ok is None:
            if len(self._signatures) >= 200_000:
                with self._lock:
                    self._signatures.clear()
            ok = self._signatures[key] = _signed_by(cert, node.info.cert)
        return ok

    def _best_issuer(self, cert: x509.Certificate, info: CertInfo, at: dt.datetime,
                     offset: int) -> CANode | Reason:
        """The store CA that signed ``cert`` with the fewest path errors, or why none did."""
        named = self._by_subject.get(cert.issuer)
        if not named:
            return Reason("chain.no_issuer",
                          f"No CA named {info.issuer} is in the trust directory (issuer of {info.name}).",
                          "Add the issuing CA's certificate (and its root) to the trust directory.")
        candidates = [n for n in named if n.info.cert is not cert and _aki_matches(cert, n.info)]
        signers = [n for n in candidates if self._signed_by_node(cert, info, n)]
        if not signers and candidates and _weak_signature(cert, "") is not None:
            # cryptography cannot check SHA-1/MD5 signatures at all; the weak-signature
            # reason already fails the certificate, so follow the named issuer to report
            # the rest of the path too instead of a misleading "wrong key".
            signers = candidates[:1]
        if not signers:
            return Reason("chain.signature",
                          f"The signature on {info.name} does not verify with the key of "
                          f"{named[0].info.name} in the trust directory.",
                          "The certificate was signed by a different key with the same CA name; "
                          "get the right CA certificate or reissue the certificate.")
        if len(signers) == 1:
            return signers[0]
        return min(signers, key=lambda n: len(self._path(n, at, offset).errors))

    def _cross_check(self, cert: x509.Certificate, path: list[x509.Certificate],
                     at: dt.datetime) -> Reason | None:
        """Run cryptography's verifier over a path that passed our own checks.

        Extension policies are relaxed to ``permit_all`` because EKU/keyUsage/policies are
        checked above with escort's own (non-Web-PKI) rules; what remains is the
        verifier's path validation: signatures, validity, basicConstraints, pathLen,
        name constraints and its algorithm allow-list.
        """
        anchor = path[-1]
        key = (id(anchor), at)
        verifier = self._verifiers.get(key)
        if verifier is None:
            if len(self._verifiers) >= 64:
                with self._lock:
                    self._verifiers.pop(next(iter(self._verifiers)), None)
            # The verifier insists that a CA policy requires basicConstraints; it is
            # the one extension we leave to it (our own check runs first anyway).
            ca_policy = xv.ExtensionPolicy.permit_all().require_present(
                x509.BasicConstraints, xv.Criticality.AGNOSTIC, None)
            verifier = self._verifiers[key] = (
                xv.PolicyBuilder().store(xv.Store([anchor])).time(at).max_chain_depth(MAX_PATH_DEPTH)
                .extension_policies(ca_policy=ca_policy, ee_policy=xv.ExtensionPolicy.permit_all())
                .build_client_verifier()
            )
        try:
            verifier.verify(cert, path[:-1])
        except (xv.VerificationError, ValueError) as exc:
            return Reason("chain.verifier",
                          f"cryptography's path validation rejects the chain: {exc}.",
                          "Reissue the certificate or CA with standard algorithms and extensions.")
        return None


def _usage_reasons(cert: x509.Certificate, leaf: CertInfo, kind: CertKind) -> list[Reason]:
    """keyUsage/extendedKeyUsage the leaf needs: hosts are QEMU TLS servers and clients."""
    out: list[Reason] = []
    prefix = "host" if kind == "host" else "owner"
    ku = _key_usage(cert)
    if ku is None or not ku.digital_signature:
        out.append(Reason(
            f"{prefix}.keyusage",
            f"{leaf.name} has " + ("no keyUsage extension" if ku is None
                                   else "keyUsage without digitalSignature") + ".",
            "Reissue it with keyUsage digitalSignature" + (", keyEncipherment." if kind == "host" else ".")))
    if kind == "host":
        eku = _eku(cert)
        have = set(eku) if eku else set()
        missing = [n for o, n in ((ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
                                  (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")) if o not in have]
        if missing:
            out.append(Reason(
                "host.eku",
                f"{leaf.name} lacks extendedKeyUsage {' and '.join(missing)}; QEMU uses the host "
                "certificate as TLS server and client.",
                "Reissue it with extendedKeyUsage serverAuth, clientAuth."))
    return out


def _link(nodes: list[CANode], problems: list[Problem]) -> None:
    """Parent links by name + AKI/SKI + signature; shortest path from an anchor wins.

    Breadth-first from the anchors, so cross-signed CAs that point at each other can
    never make this loop; whatever is not reached is either under a missing root or
    in a loop, and is reported as such.
    """
    by_subject: dict[x509.Name, list[CANode]] = {}
    for n in nodes:
        by_subject.setdefault(n.info.cert.subject, []).append(n)
    issued: dict[int, list[CANode]] = {}
    bad_sig: dict[int, Reason] = {}
    for n in nodes:
        cert = n.info.cert
        # An anchor's self-signature carries no trust, so an old root signed with SHA-1
        # (which cryptography will not check) is still an anchor.
        if n.info.self_issued and _aki_matches(cert, n.info) and (
                _signed_by(cert, cert) or _weak_signature(cert, "") is not None):
            if n.info.is_ca:
                n.anchor = True
            else:
                n.untrusted = Reason("chain.no_anchor", f"{n.info.name} is self-signed but not a CA.",
                                     "Use a CA certificate as root.")
            continue
        named = [p for p in by_subject.get(cert.issuer, []) if p is not n]
        n.issuers = [p for p in named if _aki_matches(cert, p.info) and _signed_by(cert, p.info.cert)]
        for p in n.issuers:
            issued.setdefault(id(p), []).append(n)
        if named and not n.issuers:
            bad_sig[id(n)] = Reason(
                "trust.signature",
                f"{n.info.name}'s signature does not verify with the key of {named[0].info.name}.",
                f"Replace {n.info.source} with the CA certificate {named[0].info.name} really issued.")
            problems.append(Problem(n.info.source, bad_sig[id(n)]))
    # BFS from anchors.
    reached: set[int] = set()
    queue = sorted((n for n in nodes if n.anchor), key=lambda n: (n.info.name, n.info.fingerprint))
    reached.update(id(n) for n in queue)
    while queue:
        nxt: list[CANode] = []
        for p in queue:
            for child in issued.get(id(p), []):
                if id(child) in reached or child.anchor:
                    continue
                reached.add(id(child))
                child.parent = p
                p.children.append(child)
                nxt.append(child)
        queue = nxt
    reported_loops: set[frozenset[int]] = set()
    for n in nodes:
        if id(n) in reached or n.untrusted is not None:
            continue
        # Unreached nodes only have unreached issuers: follow the first one until we
        # meet a node already explained, a node without issuer (missing root) or a loop.
        walk: list[CANode] = []
        pos: dict[int, int] = {}
        cur: CANode | None = n
        while cur is not None and id(cur) not in pos and cur.untrusted is None:
            pos[id(cur)] = len(walk)
            walk.append(cur)
            cur = cur.issuers[0] if cur.issuers else None
        in_cycle: set[int] = set()
        if cur is not None and id(cur) in pos:
            cycle = walk[pos[id(cur)]:]
            in_cycle = {id(c) for c in cycle}
            names = " -> ".join(c.info.name for c in [*cycle, cycle[0]])
            reason = Reason("trust.loop",
                            f"CA certificates sign each other in a loop with no self-signed root: {names}.",
                            "Add the self-signed root these CAs chain to, or remove the loop's certificates.")
            if frozenset(in_cycle) not in reported_loops:
                reported_loops.add(frozenset(in_cycle))
                problems.append(Problem(", ".join(c.info.source for c in cycle), reason))
        elif cur is None and id(walk[-1]) in bad_sig:
            reason = bad_sig[id(walk[-1])]  # already reported: its named issuer did not sign it
        elif cur is None:
            top = walk[-1]
            reason = Reason("trust.no_root",
                            f"{top.info.name}'s issuer {top.info.issuer} is not in the trust directory, "
                            "so it leads to no root.",
                            f"Add the certificate of {top.info.issuer} (up to a self-signed root).")
            problems.append(Problem(top.info.source, reason))
        else:
            reason = cur.untrusted or Reason("chain.no_anchor", "no root", "Add the root CA.")
        for c in walk:
            c.untrusted = reason
            c.parent = c.issuers[0] if c.issuers else None
            # No children links inside a loop, so walking the tree downwards always ends.
            if c.parent is not None and id(c) not in in_cycle:
                c.parent.children.append(c)


def _attach_crls(nodes: list[CANode], crls: Iterable[tuple[str, bytes]], at: dt.datetime,
                 problems: list[Problem]) -> list[CRLInfo]:
    """Check each CRL's issuer, signature and dates; keep the newest per CA."""
    by_subject: dict[x509.Name, list[CANode]] = {}
    for n in nodes:
        by_subject.setdefault(n.info.cert.subject, []).append(n)
    accepted: list[CRLInfo] = []
    for source, data in crls:
        try:
            crl = load_crl(data, source)
        except InputError as exc:
            problems.append(Problem(source, Reason("file.invalid", str(exc),
                                                   "Remove the file or replace it with a valid CRL.")))
            continue
        issuer_name = crl.issuer.rfc4514_string()
        named = by_subject.get(crl.issuer, [])
        if not named:
            problems.append(Problem(source, Reason(
                "crl.unknown_issuer", f"CRL issuer {issuer_name} is not a CA in the trust directory.",
                "Add that CA's certificate, or remove the CRL.")))
            continue
        signers = [n for n in named if _crl_signed_by(crl, n)]
        if not signers:
            problems.append(Problem(source, Reason(
                "crl.wrong_issuer",
                f"CRL names {issuer_name} as issuer but is not signed by that CA's key.",
                "Fetch the CRL from the CA that really issued it.")))
            continue
        ku_ok = [n for n in signers if (ku := _key_usage(n.info.cert)) is None or ku.crl_sign]
        if not ku_ok:
            problems.append(Problem(source, Reason(
                "crl.no_crlsign", f"{signers[0].info.name} signed this CRL but lacks keyUsage cRLSign.",
                "Reissue the CA with keyUsage cRLSign.")))
            continue
        last = crl.last_update_utc
        nxt = crl.next_update_utc
        if last > at:
            problems.append(Problem(source, Reason(
                "crl.not_yet_valid",
                f"CRL of {issuer_name} is dated {last:%Y-%m-%d %H:%M} UTC, in the future.",
                "Check the clock of the machine that issued it.")))
            continue
        try:
            num_ext = crl.extensions.get_extension_for_class(x509.CRLNumber).value
            number: int | None = num_ext.crl_number
        except (x509.ExtensionNotFound, ValueError):
            number = None
        try:
            revoked = {rc.serial_number: rc.revocation_date_utc for rc in crl}
        except ValueError as exc:
            problems.append(Problem(source, Reason("file.invalid", f"{source}: malformed CRL entry ({exc})",
                                                   "Replace the CRL.")))
            continue
        info = CRLInfo(crl=crl, source=source, issuer=issuer_name, last_update=last, next_update=nxt,
                       number=number, revoked=revoked)
        if info.is_stale(at) and nxt is not None:
            problems.append(Problem(source, Reason(
                "crl.stale", f"CRL of {signers[0].info.name} was due for renewal on "
                f"{nxt:%Y-%m-%d %H:%M} UTC.", "Fetch a current CRL.", severity="warning")))
        accepted.append(info)
        for n in ku_ok:
            if n.crl is None or _newer(info, n.crl):
                n.crl = info
    return accepted


def _crl_signed_by(crl: x509.CertificateRevocationList, node: CANode) -> bool:
    try:
        key = node.info.cert.public_key()
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


def _newer(a: CRLInfo, b: CRLInfo) -> bool:
    if a.number is not None and b.number is not None and a.number != b.number:
        return a.number > b.number
    return a.last_update > b.last_update


__all__ = [
    "EXPIRING_DAYS",
    "CANode",
    "CRLInfo",
    "CertInfo",
    "ChainResult",
    "HostAttributes",
    "InputError",
    "Problem",
    "TrustStore",
    "cert_info",
    "classify_pem",
    "host_attributes",
    "key_type",
    "load_certificate",
    "load_certificates",
    "load_crl",
    "pem_blocks",
    "utc",
]
