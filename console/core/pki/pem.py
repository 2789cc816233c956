"""PEM/DER input: what a file holds, and certificates/CRLs out of it (or one-line errors)."""

from __future__ import annotations

import binascii
import re
import warnings
from collections.abc import Callable
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.utils import CryptographyDeprecationWarning

from ..errors import InputError
from .attributes import der_fields, facts, name_parses, names_parsed

#: A PEM block: the body runs to the first full END line, as ``\s*(.*?)-----END`` would find
#: it, but written so that the engine skips the body a run of non-dashes at a time instead of
#: trying the END line at every byte (the lazy form was ~10% of a host certificate check);
#: possessive, so a block without an END line is given up on at once.
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*+"
                        rb"((?>[^-]*(?:-(?!----END [A-Z0-9 ]+-----)[^-]*)*))"
                        rb"-----END ([A-Z0-9 ]+)-----")
_PEM_BEGIN = re.compile(rb"-----BEGIN ")
#: what ``\s`` matches in a bytes pattern (ASCII whitespace), for ``bytes.translate``
_WHITESPACE = b" \t\n\r\x0b\x0c"

#: RFC 5280 4.1.2.2: a certificate's serial number is positive. cryptography still loads a
#: zero or negative one, with a CryptographyDeprecationWarning at each read (a future release will
#: refuse to load it), and OpenSSL accepts it. escort refuses it now, as damage with a fix
#: (``serial_problem``), so that warning would only print Python's internals at the user.
warnings.filterwarnings("ignore", message="Parsed a serial number which wasn't positive",
                        category=CryptographyDeprecationWarning)


def serial_problem(cert: x509.Certificate) -> str | None:
    """Why ``cert``'s serial number is refused (zero or negative), or None."""
    serial = cert.serial_number
    if serial > 0:
        return None
    return (f"serial number {serial} is not positive (RFC 5280 requires a positive serial; "
            f"cryptography will stop loading such certificates); reissue it with a positive "
            f"serial (openssl x509 -req ... -set_serial N, or -CAcreateserial)")


PemKind = Literal["certificate", "crl", "private key", "public key", "certificate request",
                  "other"]


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
    return [(kind, label, block) for kind, label, block, _ in _pem_blocks(data, source)]


def _pem_blocks(data: bytes, source: str) -> list[tuple[PemKind, str, bytes, bytes | None]]:
    """``pem_blocks`` with each block's decoded bytes (None for a block with headers)."""
    if not _PEM_BEGIN.search(data):
        return []
    blocks: list[tuple[PemKind, str, bytes, bytes | None]] = []
    for m in _PEM_BLOCK.finditer(data):
        begin, end = m.group(1).decode(), m.group(3).decode()
        if begin != end:
            raise InputError(f"{source}: malformed PEM (BEGIN {begin} closed by END {end})")
        body = m.group(2).translate(None, _WHITESPACE)
        if b":" in m.group(2):  # RFC 1421 headers (encrypted keys): nothing we read
            kind = _label_kind(begin)
            blocks.append((kind, begin, m.group(0), None))
            continue
        try:
            decoded = binascii.a2b_base64(body, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{source}: malformed PEM ({begin} block is not valid base64)") from exc
        blocks.append((_label_kind(begin), begin, m.group(0), decoded))
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
        except x509.InvalidVersion:
            return kind  # it is one, with a damaged version field: the loader says so
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


def _canonical_pem(der: bytes) -> bytes:
    """A CERTIFICATE block as ``Certificate.public_bytes(PEM)`` and ``openssl x509`` write
    it (64-character base64 lines, ``\n``), without the newline after its END line."""
    text = binascii.b2a_base64(der, newline=False)
    lines = b"\n".join([text[i:i + 64] for i in range(0, len(text), 64)])
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----"


def _check_extensions(cert: x509.Certificate, source: str,
                      fields: tuple[bytes, bytes, bytes, bytes] | None = None) -> None:
    """Read every field once, so a damaged certificate fails at the door.

    cryptography parses names, extensions and keys lazily: a damaged certificate can
    load fine and raise ValueError/InvalidVersion later, deep inside a check.
    ``fields``: ``der_fields`` of the bytes ``cert`` was parsed from; an issuer whose bytes
    are a Name parsed before (``name_parses``: e.g. the subject of the CA that issued it)
    cannot fail to parse, so it is not parsed here (nor later, for a chain check).
    """
    try:
        _ = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise InputError(f"{source}: certificate has a malformed extension ({exc})") from exc
    try:
        _ = cert.subject
        if fields is None or not name_parses(fields[2]):
            _ = cert.issuer
        _ = (cert.serial_number, cert.public_key(),
             cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_hash_algorithm)
    except UnsupportedAlgorithm:
        pass  # reported by the checks as key.unsupported / chain.signature, with context
    except Exception as exc:  # ValueError, InvalidVersion...: damage of any kind
        raise InputError(f"{source}: damaged certificate ({exc})") from exc
    bad_serial = serial_problem(cert)
    if bad_serial is not None:
        raise InputError(f"{source}: {bad_serial}")
    if fields is not None:
        names_parsed(fields[2], fields[3])  # (both parsed now, or known to parse)


def load_certificates(data: bytes, source: str, *, require_pem: bool = False) -> list[x509.Certificate]:
    """Every certificate in ``data`` (a PEM bundle or one DER certificate).

    Anything else (a CRL, a key, a CSR, malformed PEM, binary noise) is a one-line
    InputError naming ``source``. ``require_pem`` refuses DER, for files that tools
    such as QEMU read and which must therefore be PEM.
    """
    if not data.strip():
        raise InputError(f"{source}: empty file, expected a certificate")
    blocks = _pem_blocks(data, source)
    if blocks:
        certs: list[x509.Certificate] = []
        for kind, label, block, decoded in blocks:
            if kind != "certificate":
                continue
            try:
                if decoded is not None and label == "CERTIFICATE" and block == _canonical_pem(decoded):
                    # written as cryptography and OpenSSL write it: what the PEM reader would
                    # decode is ``decoded``, and then it loads that DER (skipping its PEM
                    # parser: ~4% of a host check's instructions)
                    cert = x509.load_der_x509_certificate(decoded)
                else:
                    cert = x509.load_pem_x509_certificate(block)
            except (ValueError, x509.InvalidVersion) as exc:
                raise InputError(f"{source}: malformed PEM ({label} block is not a valid "
                                 f"X.509 certificate: {exc})") from exc
            fields = der_fields(decoded) if decoded is not None else None
            _check_extensions(cert, source, fields)
            # the bytes cryptography just parsed (the same base64, decoded the same way): what
            # the fingerprint and the signature check's shortcut read (attributes.facts)
            f = facts(cert)
            f.der, f.fields = decoded, fields
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
        try:
            cert = x509.load_der_x509_certificate(data)
        except (ValueError, x509.InvalidVersion) as exc:
            raise InputError(f"{source}: damaged certificate ({exc})") from exc
        fields = der_fields(data)
        _check_extensions(cert, source, fields)
        f = facts(cert)
        f.der, f.fields = data, fields
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
        except (ValueError, x509.InvalidVersion) as exc:
            raise InputError(f"{source}: malformed PEM (X509 CRL block is not a valid CRL)") from exc
    der = _der_kind(data)
    if der == "crl":
        try:
            return x509.load_der_x509_crl(data)
        except (ValueError, x509.InvalidVersion) as exc:
            raise InputError(f"{source}: damaged CRL ({exc})") from exc
    if der is not None:
        raise InputError(f"{source}: {_WRONG_KIND[der]} (DER), expected a CRL")
    raise InputError(f"{source}: not a CRL (neither PEM nor DER)")

