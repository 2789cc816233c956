"""CRLs: which CA issued each one, its signature and dates, and who it revokes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

from ..errors import InputError
from ..reasons import Reason
from .attributes import key_usage
from .model import CANode, CRLInfo, Problem
from .pem import load_crl


def crl_stale_warning(node: CANode, at: dt.datetime) -> Reason | None:
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


def attach_crls(by_subject: Mapping[x509.Name, list[CANode]], crls: Iterable[tuple[str, bytes]],
                at: dt.datetime, problems: list[Problem]) -> list[CRLInfo]:
    """Check each CRL's issuer, signature and dates; keep the newest per CA."""
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
        signers = [n for n in named if crl_signed_by(crl, n)]
        if not signers:
            problems.append(Problem(source, Reason(
                "crl.wrong_issuer",
                f"CRL names {issuer_name} as issuer but is not signed by that CA's key.",
                "Fetch the CRL from the CA that really issued it.")))
            continue
        ku_ok = [n for n in signers if (ku := key_usage(n.info.cert)) is None or ku.crl_sign]
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
            if n.crl is None or newer(info, n.crl):
                n.crl = info
    return accepted


def crl_signed_by(crl: x509.CertificateRevocationList, node: CANode) -> bool:
    try:
        key = node.info.cert.public_key()
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False


def newer(a: CRLInfo, b: CRLInfo) -> bool:
    if a.number is not None and b.number is not None and a.number != b.number:
        return a.number > b.number
    return a.last_update > b.last_update
