"""What a certificate says: its extensions, the facts escort shows, a host's attributes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import InputError
from .model import _LAZY, DEFAULT_POLICY_NAMES, CertInfo, HostAttributes

_E = TypeVar("_E", bound=x509.ExtensionType)


class _Facts:
    """What one certificate says, each part read once (a per-certificate memo).

    cryptography answers every ``get_extension_for_class`` with a linear, isinstance-heavy
    walk and every ``get_attributes_for_oid`` with a new list; a host check asks ~15 such
    questions about the same certificate (``cert_info``, the usage checks, the issuer
    lookup, ``host_attributes``). Each part is computed on first use, at the very call
    that used to compute it, so a damaged certificate raises exactly what and where it
    raised before (nothing is stored for a part that raised).
    """

    __slots__ = ("cert", "der", "exts", "fields", "key_type", "spki_sha256", "subject_first")

    def __init__(self, cert: x509.Certificate) -> None:
        self.cert = cert  # held: while this entry lives, no other object can get its id()
        #: extension value type -> value (cryptography refuses duplicate extensions, so
        #: one per type; what ``get_extension_for_class`` would return)
        self.exts: dict[type, x509.ExtensionType] | None = None
        #: subject attribute OID -> the first value of that OID (``get_attributes_for_oid(oid)[0]``)
        self.subject_first: dict[x509.ObjectIdentifier, str | bytes] | None = None
        self.key_type: str | None = None
        self.spki_sha256: str | None = None
        #: the certificate's DER exactly as read (``pem.load_certificates`` files it when it
        #: parses the bytes into this object), else None: its SHA-256 is the fingerprint
        #: without a re-encoding (``fingerprint_of``)
        self.der: bytes | None = None
        #: ``der_fields(der)`` (made once from ``der``; None: not made, or no ``der``)
        self.fields: tuple[bytes, bytes, bytes, bytes] | None = None


#: id(certificate) -> its facts. Keyed by identity, never by subject, serial or any other
#: field: two different certificates (even with the same subject and serial) never share
#: an entry, and the entry holds the certificate, so its id cannot be reused while the
#: entry exists. Bounded: a full memo is simply emptied (only speed depends on it).
_FACTS: dict[int, _Facts] = {}
_FACTS_MAX = 4096


def facts(cert: x509.Certificate) -> _Facts:
    """The memo entry of ``cert`` (created empty on first use)."""
    hit = _FACTS.get(id(cert))
    if hit is not None and hit.cert is cert:
        return hit
    if len(_FACTS) >= _FACTS_MAX:
        _FACTS.clear()
    hit = _FACTS[id(cert)] = _Facts(cert)
    return hit


def _tlv(der: bytes, pos: int, tag: int) -> tuple[int, int]:
    """(start of contents, end) of the DER element at ``pos``, which must have ``tag``
    (one-byte tags only); ValueError for anything else."""
    if der[pos] != tag:
        raise ValueError("unexpected tag")
    size = der[pos + 1]
    pos += 2
    if size & 0x80:
        count = size & 0x7F
        if not 1 <= count <= 3:
            raise ValueError("unexpected length")
        size = int.from_bytes(der[pos:pos + count], "big")
        pos += count
    end = pos + size
    if end > len(der):
        raise ValueError("truncated")
    return pos, end


def der_fields(der: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """(outer signature algorithm, inner signature algorithm, issuer, subject) of an X.509
    certificate's DER: each the whole DER element exactly as it is in ``der``; None when
    ``der`` is not laid out as RFC 5280 says (then nothing is read from it).

    Only ever used to compare bytes (two equal elements are equal values for
    cryptography too); every value escort shows or checks is cryptography's.
    """
    try:
        body, end = _tlv(der, 0, 0x30)  # Certificate
        if end != len(der):
            return None
        tbs, tbs_end = _tlv(der, body, 0x30)  # TBSCertificate
        outer = der[tbs_end:_tlv(der, tbs_end, 0x30)[1]]
        pos = tbs
        if der[pos] == 0xA0:  # [0] EXPLICIT version
            pos = _tlv(der, pos, 0xA0)[1]
        pos = _tlv(der, pos, 0x02)[1]  # serialNumber
        fields = []
        for _ in range(4):  # signature, issuer, validity, subject
            end = _tlv(der, pos, 0x30)[1]
            fields.append(der[pos:end])
            pos = end
        if pos > tbs_end:
            return None
    except (ValueError, IndexError):
        return None
    return outer, fields[0], fields[1], fields[3]


def fields_of(cert: x509.Certificate) -> tuple[bytes, bytes, bytes, bytes] | None:
    """``der_fields`` of the DER ``cert`` was read from (None when escort did not read it)."""
    f = facts(cert)
    if f.fields is None and f.der is not None:
        f.fields = der_fields(f.der)
    return f.fields


#: Names (the DER of an X.509 Name) that cryptography has turned into a ``Name`` without an
#: error: the subjects and issuers of the certificates ``pem.load_certificates`` let in. A
#: certificate whose issuer is byte for byte one of these needs no parse of its issuer at
#: the door (the same bytes parse the same way); a host certificate's issuer is its CA's
#: subject. Bounded like ``_FACTS`` (only speed depends on it).
_NAMES_OK: set[bytes] = set()


def name_parses(der: bytes) -> bool:
    """Whether a Name of exactly these bytes has been parsed without error before."""
    return der in _NAMES_OK


def names_parsed(*ders: bytes) -> None:
    """Remember Names (DER) that cryptography parsed without error."""
    if len(_NAMES_OK) >= _FACTS_MAX:
        _NAMES_OK.clear()
    _NAMES_OK.update(ders)


def _extensions(cert: x509.Certificate) -> dict[type, x509.ExtensionType]:
    f = facts(cert)
    exts = f.exts
    if exts is None:
        exts = {}
        for e in cert.extensions:  # raises what ``cert.extensions`` raises for a damaged one
            exts.setdefault(type(e.value), e.value)
        f.exts = exts
    return exts


def ext(cert: x509.Certificate, cls: type[_E]) -> _E | None:
    """The certificate's extension of type ``cls``, or None when it has none."""
    return _extensions(cert).get(cls)  # type: ignore[return-value]


def subject_first(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    """``str`` of the first subject attribute with ``oid``, or None when there is none."""
    f = facts(cert)
    first = f.subject_first
    if first is None:
        first = {}
        for attr in cert.subject:  # RDN order, as ``get_attributes_for_oid`` lists them
            first.setdefault(attr.oid, attr.value)
        f.subject_first = first
    value = first.get(oid)
    return None if value is None else str(value)


def basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    return ext(cert, x509.BasicConstraints)


def key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    return ext(cert, x509.KeyUsage)


def ext_key_usage(cert: x509.Certificate) -> x509.ExtendedKeyUsage | None:
    return ext(cert, x509.ExtendedKeyUsage)


def subject_alt_names(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    return ext(cert, x509.SubjectAlternativeName)


def name_constraints_of(cert: x509.Certificate) -> x509.NameConstraints | None:
    return ext(cert, x509.NameConstraints)


def ski_of(cert: x509.Certificate) -> bytes | None:
    value = ext(cert, x509.SubjectKeyIdentifier)
    return value.digest if value is not None else None


def aki_of(cert: x509.Certificate) -> bytes | None:
    value = ext(cert, x509.AuthorityKeyIdentifier)
    return value.key_identifier if value is not None else None


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def key_type(cert: x509.Certificate) -> str:
    """"EC P-256", "RSA 2048", "Ed25519"... for display and the key checks."""
    f = facts(cert)
    if f.key_type is None:
        f.key_type = _key_type(cert)
    return f.key_type


def _key_type(cert: x509.Certificate) -> str:
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


def gn_text(name: x509.GeneralName) -> str:
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


def nc_summary(nc: x509.NameConstraints | None) -> str:
    if nc is None:
        return ""
    parts = []
    if nc.permitted_subtrees:
        parts.append("permit " + ", ".join(gn_text(n) for n in nc.permitted_subtrees))
    if nc.excluded_subtrees:
        parts.append("exclude " + ", ".join(gn_text(n) for n in nc.excluded_subtrees))
    return "; ".join(parts)


def email_of(cert: x509.Certificate) -> str:
    """The first rfc822Name SAN, else the subject's emailAddress, else ""."""
    san = subject_alt_names(cert)
    mails = san.get_values_for_type(x509.RFC822Name) if san else []
    if mails:
        return str(mails[0])
    return subject_first(cert, NameOID.EMAIL_ADDRESS) or ""


def common_name(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def der_of(cert: x509.Certificate) -> bytes:
    """The certificate's DER: the bytes as read when ``pem.load_certificates`` made this
    object (cryptography parses strict DER only: they are what it would write), else
    cryptography's encoding."""
    der = facts(cert).der
    return der if der is not None else cert.public_bytes(serialization.Encoding.DER)


def fingerprint_of(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, lowercase hex (``CertInfo.fingerprint``).

    Of the bytes as read when ``pem.load_certificates`` made this object (cryptography
    parses strict DER only, so those are the bytes it would re-encode; ~15x cheaper than
    ``Certificate.fingerprint``, which re-encodes first), else ``Certificate.fingerprint``.
    """
    der = facts(cert).der
    if der is not None:
        return hashlib.sha256(der).hexdigest()
    return cert.fingerprint(hashes.SHA256()).hex()


def cert_info(cert: x509.Certificate, source: str = "") -> CertInfo:
    """The facts escort shows about a certificate; InputError for unparseable extensions.

    The fields a chain check reads are made here; the others (``model.LAZY_FIELDS``: the
    subject and issuer strings, key type, key usages, identifiers...) by ``lazy_field`` when
    first read. Every part that can fail is read here, in the same order as always
    (the extensions, then the names), so a damaged certificate raises what and where it
    always did; what is left is formatting of values cryptography has already parsed.
    """
    try:
        basic = basic_constraints(cert)
        key_usage(cert)
        ext_key_usage(cert)
        name_constraints_of(cert)
        pol = ext(cert, x509.CertificatePolicies)
        ski_of(cert), aki_of(cert)
        email_of(cert)
    except ValueError as exc:
        raise InputError(f"{source or 'certificate'}: malformed extension ({exc})") from exc
    name = subject_first(cert, NameOID.COMMON_NAME)  # (cryptography parses the subject here)
    parts = fields_of(cert)
    if parts is None or parts[2] not in _NAMES_OK:
        _ = cert.issuer  # parsed here as always (a damaged issuer name raises here, not later)
    is_ca = bool(basic and basic.ca)
    fields: dict[str, object] = {
        "cert": cert,
        "name": name,
        "serial": cert.serial_number,
        "fingerprint": fingerprint_of(cert),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "is_ca": is_ca,
        "path_len": basic.path_length if basic and basic.ca else None,
        "policies": tuple(p.policy_identifier.dotted_string for p in pol)
        if isinstance(pol, x509.CertificatePolicies) else (),
        "source": source,
    }
    if not name:  # no common name: the name is the whole subject
        fields["name"] = fields["subject"] = cert.subject.rfc4514_string()
    info: CertInfo = object.__new__(CertInfo)
    info.__dict__.update(fields)  # (a frozen dataclass: its __init__ would do the same, field by field)
    return info


def lazy_field(info: CertInfo, cert: x509.Certificate, field: str) -> object:
    """One of ``model.LAZY_FIELDS`` of ``info`` (made by ``cert_info`` from ``cert``), made as
    ``cert_info`` always made it."""
    if field == "subject":
        return cert.subject.rfc4514_string()
    if field == "issuer":
        return cert.issuer.rfc4514_string()
    if field == "key_type":
        return key_type(cert)
    if field == "name_constraints":
        return nc_summary(name_constraints_of(cert))
    if field == "ski":
        ski = ski_of(cert)
        return ski.hex() if ski else ""
    if field == "aki":
        aki = aki_of(cert)
        return aki.hex() if aki else ""
    if field == "key_usage":
        ku = key_usage(cert)
        if ku is None:
            return ()
        return tuple(n for bit, n in zip(_KU_BITS, _KU_NAMES, strict=True) if getattr(ku, bit))
    if field == "ext_key_usage":
        eku = ext_key_usage(cert)
        return tuple(_EKU_NAMES.get(o, o.dotted_string) for o in eku) if eku else ()
    if field == "constraints":
        if not info.is_ca:
            return "not a CA"
        return "CA" if info.path_len is None else f"CA, pathLen {info.path_len}"
    if field == "email":
        return email_of(cert)
    raise AttributeError(field)


_LAZY[:] = [lazy_field]


#: the default policy names by OID, and the last fleet table's (its items, then by OID)
_DEFAULT_BY_OID = {oid: name for name, oid in DEFAULT_POLICY_NAMES.items()}
_LAST_BY_OID: list[tuple[tuple[tuple[str, str], ...], dict[str, str]]] = []


def _names_by_oid(policy_names: Mapping[str, str] | None) -> dict[str, str]:
    """dotted OID -> friendly name: ``DEFAULT_POLICY_NAMES`` extended and overridden by
    ``policy_names`` (made once per table content; the caller must not change it)."""
    if not policy_names:
        return _DEFAULT_BY_OID
    items = tuple(policy_names.items())
    last = _LAST_BY_OID[0] if _LAST_BY_OID else None
    if last is not None and last[0] == items:
        return last[1]
    table = {**DEFAULT_POLICY_NAMES, **policy_names}
    by_oid = {oid: name for name, oid in table.items()}
    _LAST_BY_OID[:] = [(items, by_oid)]
    return by_oid


def host_attributes(cert: x509.Certificate, policy_names: Mapping[str, str] | None = None) -> HostAttributes:
    """What a host certificate says about the host, for placement policies.

    ``policy_names`` maps friendly names to dotted OIDs (the fleet file's table, same
    direction as ``issuance.DEFAULT_POLICY_NAMES``, which it extends and overrides).
    """
    by_oid = _names_by_oid(policy_names)
    try:
        san = subject_alt_names(cert)
        pol = ext(cert, x509.CertificatePolicies)
    except ValueError as exc:
        raise InputError(f"certificate {cert.subject.rfc4514_string()}: malformed extension") from exc
    dns: list[str] = []
    ips: list[str] = []
    for gn in san or ():  # (``get_values_for_type`` per type, in one pass)
        if isinstance(gn, x509.DNSName):
            dns.append(gn.value)
        elif isinstance(gn, x509.IPAddress):
            ips.append(str(gn.value))
    oids = ([p.policy_identifier.dotted_string for p in pol]
            if isinstance(pol, x509.CertificatePolicies) else [])
    subject_first(cert, NameOID.COMMON_NAME)  # (fills the memo read below)
    first = facts(cert).subject_first or {}
    cn, country = first.get(NameOID.COMMON_NAME), first.get(NameOID.COUNTRY_NAME)
    state, locality = first.get(NameOID.STATE_OR_PROVINCE_NAME), first.get(NameOID.LOCALITY_NAME)
    org, unit = first.get(NameOID.ORGANIZATION_NAME), first.get(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return HostAttributes(
        common_name=(None if cn is None else str(cn)) or cert.subject.rfc4514_string(),
        country=None if country is None else str(country),
        state=None if state is None else str(state),
        locality=None if locality is None else str(locality),
        organization=None if org is None else str(org),
        org_unit=None if unit is None else str(unit),
        dns_names=tuple(dns),
        ips=tuple(ips),
        policies=frozenset(by_oid.get(o, o) for o in oids),
        not_after=cert.not_valid_after_utc,
    )


