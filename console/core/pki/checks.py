"""Checks of one certificate on its own: signature by an issuer, key, algorithm, dates, usage."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..reasons import Reason
from .attributes import aki_of, ext_key_usage, key_type, key_usage
from .model import MIN_RSA_BITS, CertInfo, CertKind


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Did ``issuer``'s key sign ``cert``? (name match is checked by the caller too)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
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


