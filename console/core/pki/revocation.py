"""CRLs: which CA issued each one, whether it can be used, and who it revokes.

Revocation fails closed. For every certificate on a path, the CA that issued it must
have a usable, current base CRL in the trust directory:

* a CRL is *unusable* when it is forged (names the CA but no key of that name signed
  it), carries a critical extension escort does not process, has a scope escort does
  not handle (issuingDistributionPoint with onlySome*/indirect, entries for another
  issuer), is signed by a CA without keyUsage cRLSign, is dated in the future or has a
  damaged entry;
* a *delta* CRL (critical deltaCRLIndicator) never replaces a base CRL: it is applied
  on top of the newest base CRL it belongs to (base number >= its BaseCRLNumber, own
  number higher; its removeFromCRL entries only while it is current), and otherwise
  ignored with a warning;
* no usable CRL, or a stale one (nextUpdate passed), means the revocation status is
  unknown: ``revocation.unusable`` / ``revocation.stale`` / ``revocation.missing``,
  which refuse. Only ``revocation.missing`` (a CA that publishes no CRL at all) may be
  downgraded to a warning (``missing_crl = "warn"`` in the fleet file).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import CRLEntryExtensionOID, ExtensionOID

from ..errors import InputError
from ..reasons import Reason
from .attributes import key_usage
from .model import CANode, CertInfo, CRLInfo, MissingCRL, Problem
from .pem import load_crl

#: CRL extensions escort processes (or may safely ignore), so they may be critical.
HANDLED_CRL_EXTENSIONS = frozenset({
    ExtensionOID.CRL_NUMBER,
    ExtensionOID.DELTA_CRL_INDICATOR,
    ExtensionOID.ISSUING_DISTRIBUTION_POINT,
    ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
})
HANDLED_ENTRY_EXTENSIONS = frozenset({
    CRLEntryExtensionOID.CRL_REASON,
    CRLEntryExtensionOID.INVALIDITY_DATE,
})


def _unusable(code: str, message: str, fix: str) -> Reason:
    return Reason(code, message, fix)


def _parse(crl: x509.CertificateRevocationList, source: str, issuer_name: str
           ) -> tuple[int | None, int | None, dict[int, dt.datetime], frozenset[int]] | Reason:
    """(number, base number of a delta, revoked serials, removeFromCRL serials) or why unusable."""
    exts = crl.extensions
    for e in exts:
        if e.critical and e.oid not in HANDLED_CRL_EXTENSIONS:
            return _unusable("crl.critical_extension",
                             f"CRL of {issuer_name} ({source}) has a critical extension escort does not "
                             f"process ({e.oid.dotted_string}), so it cannot be used.",
                             "Publish a CRL without that extension (or with it non-critical).")
    try:
        number: int | None = exts.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = None
    try:
        base: int | None = exts.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number
    except x509.ExtensionNotFound:
        base = None
    if base is not None and number is None:
        return _unusable("crl.scope", f"Delta CRL of {issuer_name} ({source}) has no CRL number.",
                         "Publish delta CRLs with a cRLNumber extension.")
    try:
        idp = exts.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        idp = None
    if idp is not None and (idp.only_contains_user_certs or idp.only_contains_ca_certs
                            or idp.only_some_reasons or idp.indirect_crl
                            or idp.only_contains_attribute_certs):
        return _unusable("crl.scope",
                         f"CRL of {issuer_name} ({source}) covers only part of what the CA issued "
                         "(issuingDistributionPoint scope), which escort does not handle.",
                         "Publish a full CRL (no onlySomeReasons/onlyContains*/indirectCRL).")
    revoked: dict[int, dt.datetime] = {}
    removed: set[int] = set()
    for entry in crl:
        for e in entry.extensions:
            if e.critical and e.oid not in HANDLED_ENTRY_EXTENSIONS:
                return _unusable("crl.scope",
                                 f"CRL of {issuer_name} ({source}) has an entry with a critical "
                                 f"extension escort does not process ({e.oid.dotted_string}).",
                                 "Publish a CRL whose entries carry only reasonCode/invalidityDate.")
        try:
            reason: x509.ReasonFlags | None = entry.extensions.get_extension_for_class(
                x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = None
        if base is not None and reason == x509.ReasonFlags.remove_from_crl:
            removed.add(entry.serial_number)
        else:
            revoked[entry.serial_number] = entry.revocation_date_utc
    return number, base, revoked, frozenset(removed)


def attach_crls(by_subject: Mapping[x509.Name, list[CANode]], crls: Iterable[tuple[str, bytes]],
                at: dt.datetime, problems: list[Problem],
                loose: list[tuple[str, bytes]] | None = None) -> list[CRLInfo]:
    """Check each CRL; attach usable base and delta CRLs to the CA whose key signed them.

    A CRL that names a CA of the store but cannot be used is recorded on that CA
    (``CANode.crl_unusable``) as well as reported as a file problem.
    """
    accepted: list[CRLInfo] = []
    deltas: list[tuple[CRLInfo, CANode]] = []
    for source, data in crls:
        try:
            crl = load_crl(data, source)
            issuer = crl.issuer
            issuer_name = issuer.rfc4514_string()
        except InputError as exc:
            problems.append(Problem(source, Reason("file.invalid", str(exc),
                                                   "Remove the file or replace it with a valid CRL.")))
            continue
        except Exception as exc:  # damaged issuer name, bad version...: this file only
            problems.append(Problem(source, Reason("file.invalid", f"{source}: damaged CRL ({exc})",
                                                   "Remove the file or replace it with a valid CRL.")))
            continue
        named = by_subject.get(issuer, [])
        if not named:
            if loose is not None:  # perhaps for a CA that arrives in a chain file / x5c
                loose.append((source, data))
            problems.append(Problem(source, Reason(
                "crl.unknown_issuer", f"CRL issuer {issuer_name} is not a CA in the trust directory.",
                "Add that CA's certificate, or remove the CRL.", severity="warning")))
            continue

        def unusable(reason: Reason, nodes: list[CANode] = named, source: str = source) -> None:
            problems.append(Problem(source, reason))
            for n in nodes:
                n.crl_unusable.append(reason)

        signers = [n for n in named if crl_signed_by(crl, n)]
        if not signers:
            unusable(Reason(
                "crl.wrong_issuer",
                f"CRL {source} names {issuer_name} as issuer but is not signed by that CA's key "
                "(forged or from another CA).",
                "Fetch the CRL from the CA that really issued it."))
            continue
        ku_ok = [n for n in signers if (ku := key_usage(n.info.cert)) is None or ku.crl_sign]
        if not ku_ok:
            unusable(Reason(
                "crl.no_crlsign", f"{signers[0].info.name} signed CRL {source} but lacks keyUsage cRLSign.",
                "Reissue the CA with keyUsage cRLSign."))
            continue
        try:
            last = crl.last_update_utc
            nxt = crl.next_update_utc
            parsed = _parse(crl, source, issuer_name)
        except Exception as exc:  # damaged extension or entry
            unusable(Reason("crl.damaged", f"{source}: damaged CRL ({exc}).", "Replace the CRL."))
            continue
        if isinstance(parsed, Reason):
            unusable(parsed)
            continue
        if last > at:
            unusable(Reason(
                "crl.not_yet_valid",
                f"CRL of {issuer_name} ({source}) is dated {last:%Y-%m-%d %H:%M} UTC, in the future.",
                "Check the clock of the machine that issued it."))
            continue
        number, base, revoked, removed = parsed
        info = CRLInfo(crl=crl, source=source, issuer=issuer_name, last_update=last, next_update=nxt,
                       number=number, revoked=revoked, base_number=base, removed=removed,
                       signer=ku_ok[0].info.fingerprint)
        if info.is_stale(at) and nxt is not None:
            problems.append(Problem(source, Reason(
                "crl.stale", f"CRL of {signers[0].info.name} was due for renewal on "
                f"{nxt:%Y-%m-%d %H:%M} UTC; revocation of what it covers is unknown.",
                "Fetch a current CRL.", severity="warning")))
        accepted.append(info)
        for n in ku_ok:
            if info.is_delta:
                deltas.append((info, n))
            elif n.crl is None or newer(info, n.crl):
                n.crl = info
        if not info.is_delta:
            for n in named:
                if n not in signers:
                    n.crl_other.append((info, ku_ok[0]))
    for info, n in deltas:
        base_crl = n.crl
        fits = (base_crl is not None and base_crl.number is not None and info.number is not None
                and info.base_number is not None
                and base_crl.number >= info.base_number and info.number > base_crl.number)
        if fits:
            if n.delta is None or newer(info, n.delta):
                n.delta = info
            continue
        why = ("there is no base CRL of that CA" if base_crl is None
               else f"it does not belong to the base CRL number {base_crl.number}")
        problems.append(Problem(info.source, Reason(
            "crl.delta_ignored",
            f"Delta CRL {info.source} of {n.info.name} (base {info.base_number}, number {info.number}) "
            f"is ignored: {why}; a delta CRL never replaces a base CRL.",
            "Put the matching base CRL in the trust directory.", severity="warning")))
    return accepted


def revoked_by(node: CANode, serial: int, at: dt.datetime) -> dt.datetime | None:
    """When ``node``'s CRLs (base + current delta) revoke ``serial`` as of ``at``, else None."""
    base = node.crl
    if base is None:
        return None
    delta = node.delta
    if delta is not None:
        # A delta's revocations always count (revoked stays revoked, even once the
        # delta is past its nextUpdate); its removeFromCRL entries only while current.
        when = delta.revoked_at(serial, at)
        if when is not None:
            return when
        if serial in delta.removed and not delta.is_stale(at):
            return None
    return base.revoked_at(serial, at)


def revocation_reasons(info: CertInfo, node: CANode, at: dt.datetime, missing: MissingCRL,
                       signer_ok: Callable[[CANode], bool], *, leaf: bool) -> list[Reason]:
    """Whether ``node`` (the issuer) revokes ``info``, or why that cannot be known.

    Errors only, except ``revocation.missing`` under ``missing="warn"`` (severity warning).
    """
    crl = node.crl
    who = info.name if leaf else f"CA {info.name}"
    if crl is None:
        others = [(c, s) for c, s in node.crl_other if signer_ok(s)]
        if others:
            other = max(others, key=lambda cs: (cs[0].number or 0, cs[0].last_update))[0]
            if other.is_stale(at):
                return [_stale(node, other, who)]
            when = other.revoked_at(info.serial, at)
            return [] if when is None else [_revoked(info, node, when, leaf)]
        if node.crl_unusable:
            first = node.crl_unusable[0]
            return [Reason(
                "revocation.unusable",
                f"Revocation status of {who} is unknown: {node.info.name}'s CRL cannot be used "
                f"({first.message.rstrip('.')}).",
                f"Put a valid CRL signed by {node.info.name} in the trust directory. ({first.fix})")]
        return [Reason(
            "revocation.missing",
            f"Revocation status of {who} is unknown: {node.info.name} has no CRL in the trust directory.",
            f"Put {node.info.name}'s CRL in the trust directory"
            + (", or set missing_crl = \"warn\" in the fleet file if this CA publishes none."
               if missing == "refuse" else "."),
            severity="warning" if missing == "warn" else "error")]
    if crl.is_stale(at):
        return [_stale(node, crl, who)]
    when = revoked_by(node, info.serial, at)
    return [] if when is None else [_revoked(info, node, when, leaf)]


def _stale(node: CANode, crl: CRLInfo, who: str) -> Reason:
    assert crl.next_update is not None
    return Reason(
        "revocation.stale",
        f"Revocation status of {who} is unknown: {node.info.name}'s CRL ({crl.source}) was due for "
        f"renewal on {crl.next_update:%Y-%m-%d %H:%M} UTC.",
        f"Fetch a current CRL from {node.info.name} into the trust directory.")


def _revoked(info: CertInfo, node: CANode, when: dt.datetime, leaf: bool) -> Reason:
    if leaf:
        return Reason("cert.revoked", f"{info.name} was revoked by {node.info.name} on {when:%Y-%m-%d}.",
                      "Issue a new certificate; a revoked one cannot be reinstated.")
    return Reason("ca.revoked", f"CA {info.name} was revoked by {node.info.name} on {when:%Y-%m-%d}.",
                  f"Use a CA that is not revoked, or reissue it from {node.info.name}.")


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
