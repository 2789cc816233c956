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

Layout of the package (each file says what it does):

* ``model``: the data types (``CertInfo``, ``CRLInfo``, ``CANode``, ``ChainResult``...).
* ``pem``: PEM/DER input, one-line errors for anything else.
* ``attributes``: extension accessors, ``cert_info``, ``host_attributes``, ``key_type``.
* ``checks``: checks of one certificate (signature by an issuer, key, dates, usage).
* ``names``: RFC 5280 name constraints.
* ``revocation``: CRLs (issuer, signature, dates, revoked serials).
* ``paths``: path building from a certificate to an anchor, with per-CA caches.
* ``store``: ``TrustStore`` (build, the one subject index, queries).
"""

from __future__ import annotations

from ..errors import InputError
from ..reasons import Reason
from .attributes import cert_info, host_attributes, key_type
from .model import (
    EXPIRING_DAYS,
    MAX_PATH_DEPTH,
    MIN_RSA_BITS,
    CANode,
    CAStatusWord,
    CertInfo,
    CertKind,
    ChainResult,
    CRLInfo,
    HostAttributes,
    Problem,
    utc,
)
from .pem import PemKind, classify_pem, load_certificate, load_certificates, load_crl, pem_blocks
from .store import TrustStore

__all__ = [
    "EXPIRING_DAYS",
    "MAX_PATH_DEPTH",
    "MIN_RSA_BITS",
    "CANode",
    "CAStatusWord",
    "CRLInfo",
    "CertInfo",
    "CertKind",
    "ChainResult",
    "HostAttributes",
    "InputError",
    "PemKind",
    "Problem",
    "Reason",
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
