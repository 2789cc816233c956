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
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from cryptography import x509

from .errors import InputError
from .reasons import Reason

CAStatusWord = Literal["valid", "expiring", "expired", "revoked", "not yet valid", "untrusted"]
EXPIRING_DAYS = 14


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

    def days_left(self, at: dt.datetime) -> int:
        return (self.not_after - at).days


@dataclass(eq=False)
class CANode:
    info: CertInfo
    parent: CANode | None = None
    children: list[CANode] = field(default_factory=list)
    revoked: bool = False  # revoked by its parent's CRL
    revocation_reason: str = ""
    crl_stale: bool = False  # this CA's own CRL is past nextUpdate

    def status(self, at: dt.datetime) -> CAStatusWord:
        raise NotImplementedError

    def path_to_root(self) -> list[CANode]:
        raise NotImplementedError


@dataclass(frozen=True)
class ChainResult:
    valid: bool
    reasons: tuple[Reason, ...]  # every failing check (severity "error")
    warnings: tuple[Reason, ...] = ()  # e.g. stale CRL
    chain: tuple[CertInfo, ...] = ()  # leaf first, anchor last (as far as it could be built)
    ca_fingerprints: frozenset[str] = frozenset()  # every CA in the path, for policy matching
    leaf: CertInfo | None = None


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


def load_certificate(data: bytes, source: str) -> x509.Certificate:
    raise NotImplementedError


def load_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    raise NotImplementedError


def cert_info(cert: x509.Certificate, source: str = "") -> CertInfo:
    raise NotImplementedError


def host_attributes(cert: x509.Certificate, policy_names: Mapping[str, str] | None = None) -> HostAttributes:
    raise NotImplementedError


class TrustStore:
    anchors: list[CANode]

    @classmethod
    def build(
        cls,
        certs: Iterable[tuple[str, bytes]],
        crls: Iterable[tuple[str, bytes]] = (),
        *,
        at: dt.datetime,
    ) -> tuple[TrustStore, list[Problem]]:
        raise NotImplementedError

    def nodes(self) -> list[CANode]:
        raise NotImplementedError

    def by_fingerprint(self, fingerprint: str) -> CANode | None:
        raise NotImplementedError

    def verify_host(self, cert: x509.Certificate, at: dt.datetime) -> ChainResult:
        raise NotImplementedError

    def verify_owner(
        self, cert: x509.Certificate, intermediates: Iterable[x509.Certificate], at: dt.datetime
    ) -> ChainResult:
        """Chain an owner's signing certificate (from a JWS x5c) to this store's anchors.

        Same checks as hosts, but the leaf needs keyUsage digitalSignature only (no
        serverAuth/clientAuth) and ``intermediates`` (the rest of x5c) may fill gaps.
        """
        raise NotImplementedError


__all__ = [
    "EXPIRING_DAYS",
    "CANode",
    "CertInfo",
    "ChainResult",
    "HostAttributes",
    "InputError",
    "Problem",
    "TrustStore",
    "cert_info",
    "host_attributes",
    "load_certificate",
    "load_crl",
]
