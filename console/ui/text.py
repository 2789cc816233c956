"""Words and glyphs for states: every status is a glyph *and* a word, never colour alone.

Pure functions over core types so they are cheap to test and reuse (CLI tables can
use them too).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from console.core.inventory import FleetKind, HostView
from console.core.issuance import DEFAULT_POLICY_NAMES
from console.core.pki import CANode, CertInfo
from console.core.reasons import Reason

OK, BAD, WARN, REVOKED, UNKNOWN = "✓", "✗", "⚠", "⊘", "?"

KIND_LABELS: dict[str, str] = {
    "demo": "demo — libvirt test driver, nothing really migrates",
    "lab": "lab — real libvirt/QEMU hosts on this machine",
    "real": "real fleet — migrations move real VMs",
}


def kind_label(kind: FleetKind | str) -> str:
    return KIND_LABELS.get(kind, str(kind))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def ca_status(node: CANode, at: dt.datetime) -> tuple[str, str, str]:
    """(glyph, words, tone) for a CA node at ``at``."""
    try:
        word = node.status(at)
    except NotImplementedError:  # pki still being written; never crash the tree
        word = "valid"
    days = node.info.days_left(at)
    if word == "revoked":
        return REVOKED, "revoked", "bad"
    if word == "expired":
        return BAD, f"expired {plural(-days, 'day')} ago" if days < 0 else "expired", "bad"
    if word == "expiring":
        return WARN, f"expiring in {plural(days, 'day')}", "warn"
    if word == "not yet valid":
        return BAD, "not yet valid", "bad"
    if word == "untrusted":
        return BAD, "untrusted", "bad"
    return OK, "valid", "ok"


def crl_words(node: CANode, at: dt.datetime) -> tuple[str, str, str]:
    """(short label, one sentence, tone) for a CA's own CRL at ``at``.

    Fresh until …, stale, missing or unusable; stale and unusable mean the revocation
    status of everything it issued is unknown, which refuses (docs/PKI.md).
    """
    state, detail = node.crl_state(at)
    crl = node.crl
    if state == "fresh":
        until = f" until {crl.next_update:%Y-%m-%d}" if crl is not None and crl.next_update else ""
        delta = " + delta" if node.delta is not None else ""
        return f"CRL fresh{until}{delta}", f"CRL {detail}.", "dim"
    if state == "stale":
        return ("CRL stale", f"CRL {detail}: the revocation status of what this CA issued is unknown, "
                "so it is refused. Fetch a current CRL.", "bad")
    if state == "unusable":
        return ("CRL unusable", f"CRL unusable: {detail} The revocation status of what this CA issued "
                "is unknown, so it is refused.", "bad")
    return ("CRL missing", "No CRL in the trust directory: the revocation status of what this CA issued "
            "is unknown (refused unless the fleet sets missing_crl = \"warn\").", "warn")


def expiry_words(not_after: dt.datetime, at: dt.datetime) -> tuple[str, str]:
    """'2026-12-01 (5 d)' style text and a tone for a certificate's end date."""
    days = (not_after - at).days
    date = not_after.strftime("%Y-%m-%d")
    if not_after <= at:
        ago = (at - not_after).days
        return (f"{BAD} expired {ago} d ago" if ago else f"{BAD} expired today"), "bad"
    if days < 14:
        return f"{WARN} {date} ({days} d)", "warn"
    return f"{date} ({days} d)", ""


def reach_words(host: HostView) -> tuple[str, str]:
    if host.reachability == "up":
        return f"{OK} up", "ok"
    if host.reachability == "down":
        return f"{BAD} down", "bad"
    return f"{UNKNOWN} unknown", "dim"


def assurance(host: HostView) -> str:
    attrs = host.attributes
    if attrs is None:
        return ""
    levels = sorted(p.split(":", 1)[1] for p in attrs.policies if p.startswith("assurance:"))
    return ",".join(levels)


def reason_lines(reasons: Iterable[Reason], indent: str = "  ") -> list[str]:
    """'• message [code]' and 'fix: ...' lines for a detail pane."""
    out: list[str] = []
    for r in reasons:
        mark = WARN if r.severity == "warning" else BAD
        out.append(f"{indent}{mark} {r.message} [{r.code}]")
        if r.fix:
            out.append(f"{indent}  fix: {r.fix}")
    return out


def policy_words(oids: Iterable[str], names: dict[str, str] | None = None) -> str:
    """Dotted certificatePolicies OIDs as friendly names where known (``assurance:high``)."""
    table = {**DEFAULT_POLICY_NAMES, **(names or {})}
    by_oid = {oid: name for name, oid in table.items()}
    return ", ".join(by_oid.get(o, o) for o in oids) or "none"


def cert_lines(info: CertInfo, at: dt.datetime, policy_names: dict[str, str] | None = None) -> list[str]:
    """The certificate facts the Trust and Hosts screens show, one per line."""
    days = info.days_left(at)
    left = f"{plural(days, 'day')} left" if days >= 0 else f"expired {plural(-days, 'day')} ago"
    constraints = "CA" if info.is_ca else "end entity"
    if info.is_ca and info.path_len is not None:
        constraints += f", path length ≤ {info.path_len}"
    if info.name_constraints:
        constraints += f", names: {info.name_constraints}"
    fp = info.fingerprint
    return [
        f"Subject      {info.subject}",
        f"Issuer       {info.issuer}",
        f"Serial       {info.serial:x}",
        f"Valid from   {info.not_before:%Y-%m-%d %H:%M} UTC",
        f"Valid until  {info.not_after:%Y-%m-%d %H:%M} UTC ({left})",
        f"Key          {info.key_type}",
        f"Constraints  {constraints}",
        f"Policies     {policy_words(info.policies, policy_names)}",
        f"SHA-256      {' '.join(fp[i:i + 8] for i in range(0, min(len(fp), 32), 8))}",
        f"             {' '.join(fp[i:i + 8] for i in range(32, len(fp), 8))}",
    ]


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """Greedy word wrap; ``indent`` prefixes continuation lines.

    ``textwrap`` costs ~100 µs a call (regex based); a target list for 1,000 hosts
    wraps thousands of reasons, so the common case (fits) returns at once and the rest
    uses a plain split.
    """
    if len(text) <= width or width < 10:
        return [text]
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        limit = width if not lines else width - len(indent)
        if current and len(current) + 1 + len(word) > limit:
            lines.append(current if not lines else indent + current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current if not lines else indent + current)
    return lines
