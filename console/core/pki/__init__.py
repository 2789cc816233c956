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
  signing certificates (policies and grants); ``ChainResult.owner_identity`` is the
  owner (issuing CA key + subject + e-mail) grants and policies bind to.
  These two are THE certificate verdict (``paths.PathBuilder._verify``): every command
  and screen uses them.
* ``host_attributes(cert, policy_names)`` -> ``HostAttributes``.

Added (also stable): ``load_certificates`` (every certificate in a PEM bundle),
``classify_pem``/``pem_blocks`` (what kind of PEM block a file holds), ``CRLInfo``,
``TrustStore.check_ca`` (the path checks of one CA), ``TrustStore.issuer_of``,
``ChainResult.as_json``, ``ChainResult.policies``, ``OwnerIdentity``, ``MissingCRL``
and ``CANode.crl_state``.

How the checks are done, and why not with ``x509.verification``
---------------------------------------------------------------
cryptography's ``PolicyBuilder`` verifier is a Web-PKI verifier: it stops at the first
error (we must report *every* failure), rejects Ed25519 CA keys (which a private PKI
may well use), takes no CRLs, knows nothing about subject attributes or policy OIDs and
calls OpenSSL's leading-dot DNS name constraint malformed. So the path is walked here
with cryptography's primitives (``Certificate.verify_directly_issued_by``,
``CertificateRevocationList.is_signature_valid``) and one small function per check.
The verifier is NOT part of the verdict (it made ``cert verify`` and the fleet disagree);
the tests cross-check it over generated chains wherever it can judge.

Everything that depends only on the CA (its path to a root, its validity, path length,
keyCertSign, name constraints between CAs, revocation by its parent's CRL, policies)
is computed once per CA per
``at`` and cached, so checking a host costs one signature check plus dictionary lookups.

What a host check still pays per certificate, and what it no longer does twice
(issue 12, s1; each shortcut only skips work whose outcome is already known, and every
value and refusal is cryptography's):

* the signature: a stored CA's key and subject are read once (``checks.SignatureCheck``);
  for ECDSA it makes ``verify_directly_issued_by``'s own checks (same inner/outer
  algorithm, issuer bytes == the CA's subject bytes, key type) on the DER as read and the
  same ``verify`` call; whatever it does not confirm is decided by
  ``verify_directly_issued_by`` itself;
* the DER as read is kept with the certificate (``attributes.facts``): the fingerprint is
  its SHA-256, a PEM block written the standard way is loaded from it, snapshots store it;
* an issuer name that is byte for byte a Name parsed before (its CA's subject) is not
  parsed again, and the CA is found by those bytes (the same group the parsed name finds);
* ``CertInfo``'s display-only fields (``model.LAZY_FIELDS``) are made on first read.

Layout of the package (each file says what it does):

* ``model``: the data types (``CertInfo``, ``CRLInfo``, ``CANode``, ``ChainResult``...).
* ``pem``: PEM/DER input, one-line errors for anything else.
* ``attributes``: extension accessors, ``cert_info``, ``host_attributes``, ``key_type``.
* ``checks``: checks of one certificate (signature by an issuer, key, dates, usage).
* ``names``: RFC 5280 name constraints.
* ``revocation``: CRLs (issuer, signature, dates, scope, base/delta, revoked serials);
  revocation fails closed.
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
    CRLStateWord,
    HostAttributes,
    MissingCRL,
    OwnerIdentity,
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
    "CRLStateWord",
    "CertInfo",
    "CertKind",
    "ChainResult",
    "HostAttributes",
    "InputError",
    "MissingCRL",
    "OwnerIdentity",
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
