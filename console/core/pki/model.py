"""The data types of the CA tree: certificates, CRLs, CA nodes, chain results."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..reasons import Reason

#: escort's private OID arc (ITU-T X.667 UUID arc, so no registration is needed).
ESCORT_ARC = "2.25.311878239837216513262473432547838426281"
#: Default friendly names for certificatePolicies OIDs; a fleet file may add more.
#: (Here rather than in issuance.py, which re-exports them: checking a certificate
#: need not import what issues one.)
DEFAULT_POLICY_NAMES: dict[str, str] = {
    "assurance:low": f"{ESCORT_ARC}.1.1",
    "assurance:medium": f"{ESCORT_ARC}.1.2",
    "assurance:high": f"{ESCORT_ARC}.1.3",
    "fips": f"{ESCORT_ARC}.2.1",
}

CAStatusWord = Literal["valid", "expiring", "expired", "revoked", "not yet valid", "untrusted"]
EXPIRING_DAYS = 14
#: Longest CA path we follow (leaf excluded); deeper means something is wrong.
MAX_PATH_DEPTH = 8
#: Smallest RSA modulus accepted (NIST SP 800-131A).
MIN_RSA_BITS = 2048

CertKind = Literal["host", "owner"]
#: What to do when a CA on a path publishes no CRL at all: refuse (revocation status
#: unknown, the default) or only warn. Stale, forged or unusable CRLs always refuse.
MissingCRL = Literal["refuse", "warn"]
#: A CA's CRL state as the Trust screen shows it.
CRLStateWord = Literal["fresh", "stale", "missing", "unusable"]


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
    email: str = ""  # first rfc822Name SAN, else subject emailAddress ("" when none)

    def days_left(self, at: dt.datetime) -> int:
        return (self.not_after - at).days

    if not TYPE_CHECKING:  # (hidden from mypy: it would make every misspelt field "Any")
        def __getattr__(self, attr: str) -> object:
            """The fields a chain check never reads, made from ``cert`` on first read.

            ``cert_info`` fills in what a verdict needs (name, serial, fingerprint, dates,
            CA flag, path length, policies) and leaves the rest -- ``LAZY_FIELDS``: the
            subject and issuer strings, key type, name-constraint summary, key
            identifiers, key usages, constraints line, e-mail -- to be made here by
            ``attributes.lazy_field`` from the certificate, exactly as ``cert_info`` used
            to make them, when something reads them (Python calls this only for an
            attribute the instance does not have; the value is then kept). Equality,
            hashing, ``repr`` and ``replace`` read every field and so get them all.
            Pickled before they are read, they are made where they are read (the
            certificate travels with the info).
            """
            if attr in LAZY_FIELDS:
                cert = self.__dict__.get("cert")
                if cert is not None and _LAZY:
                    value = _LAZY[0](self, cert, attr)
                    self.__dict__[attr] = value
                    return value
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    @property
    def fingerprint_sha1(self) -> str:
        """SHA-1 fingerprint (lowercase hex), for display next to tools that still show it.

        A property, not a field: host checks build a CertInfo per leaf and never need it.
        """
        return self.cert.fingerprint(hashes.SHA1()).hex()

    @property
    def self_issued(self) -> bool:
        return self.cert.subject == self.cert.issuer


#: CertInfo fields ``cert_info`` leaves to be made on first read (``CertInfo.__getattr__``).
#: Their class-level defaults are removed: an instance without one of them must reach
#: ``__getattr__`` instead of reading the default (``CertInfo(...)`` still fills them in).
LAZY_FIELDS = frozenset({"subject", "issuer", "key_type", "name_constraints", "ski", "aki", "key_usage",
                         "ext_key_usage", "constraints", "email"})
for _name in LAZY_FIELDS:
    if _name in CertInfo.__dict__:
        delattr(CertInfo, _name)
#: the function that makes a lazy field: ``attributes.lazy_field`` (set when it is imported)
_LAZY: list[Callable[[CertInfo, x509.Certificate, str], object]] = []


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
    #: Delta CRL: the base CRL number it applies to (deltaCRLIndicator), else None.
    base_number: int | None = None
    #: Serials a delta CRL takes off the base (reason removeFromCRL).
    removed: frozenset[int] = frozenset()
    signer: str = ""  # fingerprint of the CA certificate whose key signed it

    @property
    def is_delta(self) -> bool:
        return self.base_number is not None

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
    crl: CRLInfo | None = None  # this CA's own (newest usable) base CRL
    delta: CRLInfo | None = None  # newest usable delta CRL for ``crl`` (applied on top of it)
    #: CRLs naming this CA that cannot be used (forged, unknown critical extension,
    #: unhandled scope, damaged entry...): with no usable CRL, revocation is unknown.
    crl_unusable: list[Reason] = field(default_factory=list)
    #: Base CRLs naming this CA signed by *another* CA certificate of the same name
    #: (a re-keyed CA): used only while that signer's own certificate checks out.
    crl_other: list[tuple[CRLInfo, CANode]] = field(default_factory=list)
    untrusted: Reason | None = None  # why no path to an anchor exists (loop, missing root)

    def crl_state(self, at: dt.datetime) -> tuple[CRLStateWord, str]:
        """The CA's CRL state for the Trust screen: (word, detail)."""
        at = utc(at)
        if self.crl is not None:
            if self.crl.is_stale(at):
                assert self.crl.next_update is not None
                return "stale", f"stale since {self.crl.next_update:%Y-%m-%d %H:%M} UTC"
            until = (f"fresh until {self.crl.next_update:%Y-%m-%d %H:%M} UTC"
                     if self.crl.next_update else "fresh (no nextUpdate)")
            return "fresh", until
        if self.crl_other:
            return "fresh", f"signed by another {self.info.name} certificate"
        if self.crl_unusable:
            return "unusable", self.crl_unusable[0].message
        return "missing", "no CRL in the trust directory"

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


@dataclass(frozen=True, slots=True)
class OwnerIdentity:
    """Who an owner certificate says its holder is, as its issuing CA vouches for it.

    Two owners are the same owner only when *all three* match: the key of the owners'
    CA that issued the certificate (SHA-256 of its SubjectPublicKeyInfo, DER, lowercase
    hex), the subject and the e-mail address. A second owners' CA minting the same
    e-mail address yields a different identity.
    """

    ca_key: str  # SHA-256 of the issuing CA's SubjectPublicKeyInfo (DER), lowercase hex
    subject: str  # RFC 4514 subject of the owner certificate
    email: str  # first rfc822Name SAN, else the subject's emailAddress, else ""
    ca_name: str = ""  # display name of the issuing CA (not part of the identity)

    def key(self) -> tuple[str, str, str]:
        """The comparable identity (CA key, subject, e-mail)."""
        return (self.ca_key, self.subject, self.email.lower())

    def label(self) -> str:
        return f"{self.email or self.subject} (CA {self.ca_name or self.ca_key[:16]})"

    def as_json(self) -> dict[str, str]:
        return {"ca_key": self.ca_key, "subject": self.subject, "email": self.email,
                "ca_name": self.ca_name}


@dataclass(frozen=True)
class ChainResult:
    """The one certificate verdict (``TrustStore.verify_host``/``verify_owner``)."""

    valid: bool
    reasons: tuple[Reason, ...]  # every failing check (severity "error")
    warnings: tuple[Reason, ...] = ()  # e.g. a CA without CRL when the fleet allows that
    chain: tuple[CertInfo, ...] = ()  # leaf first, anchor last (as far as it could be built)
    ca_fingerprints: frozenset[str] = frozenset()  # every CA in the path, for policy matching
    leaf: CertInfo | None = None
    ca_names: tuple[str, ...] = ()  # names of the CAs in the path, issuer first
    #: The leaf's certificate policies (dotted OIDs) that *every* CA between it and the
    #: trust anchor asserts (or covers with anyPolicy); None when not computed.
    policies: frozenset[str] | None = None
    #: SHA-256 of the direct issuer's SubjectPublicKeyInfo (DER), lowercase hex.
    issuer_key: str = ""
    kind: CertKind = "host"

    @property
    def owner_identity(self) -> OwnerIdentity | None:
        """The owner identity of a valid owner certificate (None otherwise).

        This is what grants and policies bind to: the issuing owners' CA key plus
        the certificate's subject and e-mail address.
        """
        if not self.valid or self.kind != "owner" or self.leaf is None or not self.issuer_key:
            return None
        return OwnerIdentity(ca_key=self.issuer_key, subject=self.leaf.subject,
                             email=self.leaf.email, ca_name=self.ca_names[0] if self.ca_names else "")

    def as_json(self) -> dict[str, object]:
        """The ``escort cert verify --json`` shape (a stable contract; extended only)."""
        out: dict[str, object] = {
            "valid": self.valid,
            "reasons": [r.as_json() for r in self.reasons],
            "chain": [c.subject for c in self.chain],
            "warnings": [r.as_json() for r in self.warnings],
        }
        if self.policies is not None:
            out["policies"] = sorted(self.policies)
        owner = self.owner_identity
        if owner is not None:
            out["owner"] = owner.as_json()
        return out


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


def utc(at: dt.datetime) -> dt.datetime:
    """Aware UTC datetime (a naive one is taken to be UTC already)."""
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
