"""Checks of one certificate on its own: signature by an issuer, key, algorithm, dates, usage."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from ..reasons import Reason
from .attributes import aki_of, ext_key_usage, key_type, key_usage
from .model import MIN_RSA_BITS, CertInfo, CertKind

#: Extensions escort processes, so they may be critical. Any other critical extension
#: (RFC 5280 4.2: "MUST reject the certificate if it encounters a critical extension it
#: does not recognize") refuses the certificate. policyConstraints is processed in the
#: strictest way (explicit policy is always required, mappings are never applied);
#: inhibitAnyPolicy stops anyPolicy from counting anywhere below the CA carrying it.
HANDLED_EXTENSIONS = frozenset({
    ExtensionOID.BASIC_CONSTRAINTS,
    ExtensionOID.KEY_USAGE,
    ExtensionOID.EXTENDED_KEY_USAGE,
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    ExtensionOID.NAME_CONSTRAINTS,
    ExtensionOID.CERTIFICATE_POLICIES,
    ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ExtensionOID.POLICY_CONSTRAINTS,
    ExtensionOID.INHIBIT_ANY_POLICY,
})


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Did ``issuer``'s key sign ``cert``? (name match is checked by the caller too)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


# --- the signature of a certificate by a stored CA, without re-reading the CA's key each time
#
# ``Certificate.verify_directly_issued_by`` (``signed_by``) does four things: the inner
# (TBSCertificate) and outer signature AlgorithmIdentifiers must be equal, the issuer name
# must equal the CA's subject, the CA's key type must fit the algorithm, and then the key
# verifies the signature over the TBS bytes. It parses the CA's public key anew on every
# call and builds the hash and padding objects in Python: ~40% of its cost for a P-256
# check. ``SignatureCheck`` keeps the CA's key and subject (once per CA) and makes the same
# four checks for the one common case, ECDSA with SHA-256/384/512: the two equalities on the
# DER bytes as read (raw bytes equal => the parsed values cryptography compares are equal),
# the key type by isinstance, and the same ``verify`` call on the same TBS bytes
# (``tbs_certificate_bytes`` is the re-encoding ``verify_directly_issued_by`` signs over).
# It answers only "signed" (every check passed); anything else -- another algorithm, bytes
# it cannot walk, a mismatch, a signature that does not verify -- is left to ``signed_by``,
# so every refusal and every unusual certificate goes through cryptography's own check.

#: DER AlgorithmIdentifier (no parameters, as RFC 5758 requires) -> the ECDSA object to verify with
_ECDSA_ALGORITHMS: dict[bytes, ec.ECDSA] = {
    bytes.fromhex("300a06082a8648ce3d040302"): ec.ECDSA(hashes.SHA256()),
    bytes.fromhex("300a06082a8648ce3d040303"): ec.ECDSA(hashes.SHA384()),
    bytes.fromhex("300a06082a8648ce3d040304"): ec.ECDSA(hashes.SHA512()),
}


class SignatureCheck:
    """One CA's side of ``signed_by``, prepared once (see the comment above)."""

    __slots__ = ("key", "subject")

    def __init__(self, ca: x509.Certificate, fields: tuple[bytes, bytes, bytes, bytes] | None) -> None:
        """``fields``: ``der_fields`` of the DER ``ca`` was read from (None: not known)."""
        self.subject = fields[3] if fields is not None else None
        try:
            key = ca.public_key()
        except Exception:  # unsupported or damaged: only ``signed_by`` decides then
            key = None
        self.key = key if isinstance(key, ec.EllipticCurvePublicKey) else None

    def signed(self, cert: x509.Certificate, fields: tuple[bytes, bytes, bytes, bytes] | None) -> bool:
        """True when ``signed_by(cert, ca)`` is True for certain; False means "ask ``signed_by``".
        ``fields``: ``der_fields`` of the DER ``cert`` was read from (None: not known)."""
        if self.key is None or self.subject is None or fields is None:
            return False
        outer, inner, issuer, _ = fields
        algorithm = _ECDSA_ALGORITHMS.get(outer)
        if algorithm is None or inner != outer or issuer != self.subject:
            return False
        try:
            self.key.verify(cert.signature, cert.tbs_certificate_bytes, algorithm)
        except Exception:  # InvalidSignature or anything odd: cryptography's own check says why
            return False
        return True


def aki_matches(cert: x509.Certificate, issuer_info: CertInfo, cert_aki: str | None = None) -> bool:
    aki = cert_aki if cert_aki is not None else (aki_of(cert) or b"").hex()
    return not aki or not issuer_info.ski or aki == issuer_info.ski


_WEAK_HASHES = ("md5", "sha1")


def weak_signature(cert: x509.Certificate, who: str) -> Reason | None:
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


def key_problem(cert: x509.Certificate, who: str) -> Reason | None:
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


def validity_reasons(info: CertInfo, at: dt.datetime, code_prefix: str, who: str) -> list[Reason]:
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


def usage_reasons(cert: x509.Certificate, leaf: CertInfo, kind: CertKind) -> list[Reason]:
    """keyUsage/extendedKeyUsage the leaf needs: hosts are QEMU TLS servers and clients."""
    out: list[Reason] = []
    prefix = "host" if kind == "host" else "owner"
    ku = key_usage(cert)
    if ku is None or not ku.digital_signature:
        out.append(Reason(
            f"{prefix}.keyusage",
            f"{leaf.name} has " + ("no keyUsage extension" if ku is None
                                   else "keyUsage without digitalSignature") + ".",
            "Reissue it with keyUsage digitalSignature" + (", keyEncipherment." if kind == "host" else ".")))
    if kind == "host":
        eku = ext_key_usage(cert)
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




def critical_extension_reasons(cert: x509.Certificate, who: str, code: str) -> list[Reason]:
    """Every critical extension escort does not process refuses the certificate."""
    out: list[Reason] = []
    for e in cert.extensions:
        if e.critical and e.oid not in HANDLED_EXTENSIONS:
            name = getattr(e.oid, "_name", "") or ""
            label = (e.oid.dotted_string if not name or name == "Unknown OID"
                     else f"{name} ({e.oid.dotted_string})")
            out.append(Reason(
                code, f"{who} has a critical extension escort does not process: {label}.",
                "Reissue it without that extension, or with the extension marked non-critical."))
    return out


def end_entity_reasons(leaf: CertInfo, kind: CertKind) -> list[Reason]:
    """Hosts and owners are end entities: a CA certificate is never either."""
    if not leaf.is_ca:
        return []
    what = "host" if kind == "host" else "owner"
    return [Reason(f"{what}.is_ca",
                   f"{leaf.name} is a CA certificate (basicConstraints CA:TRUE), not a {what} certificate.",
                   f"Issue the {what} an end-entity certificate (basicConstraints CA:FALSE).")]


def owner_usage_reasons(cert: x509.Certificate, leaf: CertInfo) -> list[Reason]:
    """Owner certificates sign documents: extendedKeyUsage must include emailProtection."""
    eku = ext_key_usage(cert)
    if eku is not None and ExtendedKeyUsageOID.EMAIL_PROTECTION in eku:
        return []
    return [Reason(
        "owner.eku",
        f"{leaf.name} " + ("has no extendedKeyUsage extension" if eku is None
                           else "lacks extendedKeyUsage emailProtection")
        + "; owner certificates must say they are for signing (emailProtection).",
        "Reissue the owner certificate with extendedKeyUsage emailProtection.")]


def ca_reasons(info: CertInfo, at: dt.datetime, below: int, *, anchor: bool) -> list[Reason]:
    """The checks of one CA certificate on a path (the ONE CA check).

    ``below`` is the number of non-self-issued intermediate CAs between the leaf and
    this CA (for pathLen). The same function checks CAs from the trust directory and
    CAs that arrive with the certificate (a chain file, a JWS x5c).
    """
    errors = validity_reasons(info, at, "ca", "CA")
    if not info.is_ca:
        errors.append(Reason("ca.not_ca", f"{info.name} issued a certificate but is not a CA "
                             "(basicConstraints CA is not set).",
                             f"Reissue {info.name} as a CA certificate."))
    if info.path_len is not None and below > info.path_len:
        errors.append(Reason("ca.path_len", f"{info.name} allows {info.path_len} intermediate "
                             f"CA(s) below it (pathLen), this path has {below}.",
                             f"Issue the certificate from a CA closer to {info.name}, or reissue "
                             f"{info.name} with a larger pathLen."))
    ku = key_usage(info.cert)
    if ku is not None and not ku.key_cert_sign:
        errors.append(Reason("ca.no_keycertsign", f"{info.name}'s keyUsage lacks keyCertSign, "
                             "so it may not sign certificates.",
                             f"Reissue {info.name} with keyUsage keyCertSign."))
    kp = key_problem(info.cert, f"CA {info.name}")
    if kp is not None:
        errors.append(kp)
    if not anchor:  # an anchor's self-signature carries no trust
        weak = weak_signature(info.cert, f"CA {info.name}")
        if weak is not None:
            errors.append(weak)
    errors += critical_extension_reasons(info.cert, f"CA {info.name}", "ca.critical_extension")
    return errors
