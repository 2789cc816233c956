"""The data types of the CA tree: certificates, CRLs, CA nodes, chain results."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..reasons import Reason

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


def utc(at: dt.datetime) -> dt.datetime:
    """Aware UTC datetime (a naive one is taken to be UTC already)."""
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)
