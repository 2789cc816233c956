"""`escort check`: findings about a fleet, for cron and monitoring (pure parts).

A ``Finding`` is one thing wrong or about to break, with a stable code (docs/CHECK.md),
a severity, the VM and/or host it is about, one plain sentence and a fix. Placement
findings carry every failing check of the shared decision (``decisions.decide``).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography import x509

from .envelope import fingerprint
from .inventory import DomainFacts
from .reasons import Reason

Severity = Literal["error", "warning"]
#: Decision reasons that say nothing about whether the VM may be where it is.
NOT_PLACEMENT = frozenset({"host.current", "host.down"})
#: Reasons that mean "could not check", never "refused".
UNCHECKED = frozenset({"host.no_certificate", "host.no_attributes"})


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str
    fix: str
    vm: str = ""
    host: str = ""
    reasons: tuple[Reason, ...] = ()
    when: dt.datetime | None = None  # for expiry findings: the moment it breaks
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "severity": self.severity}
        if self.vm:
            out["vm"] = self.vm
        if self.host:
            out["host"] = self.host
        out["message"] = self.message
        out["fix"] = self.fix
        if self.reasons:
            out["reasons"] = [r.as_json() for r in self.reasons]
        if self.when is not None:
            out["when"] = iso(self.when)
        out.update(self.extra)
        return out


def iso(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def placement_reasons(reasons: Sequence[Reason]) -> tuple[list[Reason], bool]:
    """(errors that refuse the current placement, whether the check could not be made)."""
    errors = [r for r in reasons if r.severity == "error" and r.code not in NOT_PLACEMENT]
    unchecked = any(r.code in UNCHECKED for r in errors)
    return errors, unchecked


#: libvirt's taint messages (``virDomainGetMessages`` with VIR_DOMAIN_MESSAGE_TAINTING, as
#: libvirt 9.0's qemu driver words them) that mean the VM was, or may have been, driven around
#: libvirt -- where neither escort nor a host guard sees what happens (docs/GUARD.md, "What the
#: guard cannot stop") -- and what each means for placement.
RISKY_TAINTS: dict[str, str] = {
    "custom monitor control commands issued":
        "someone sent commands to its QEMU directly (virsh qemu-monitor-command): such commands "
        "can send the VM's memory to any QEMU on any host, with no hook and no guard involved",
    "custom configuration parameters specified":
        "it runs with raw QEMU arguments (<qemu:commandline>) that libvirt, escort and the guard "
        "do not interpret",
    "configuration modified by hook script":
        "a libvirt hook script rewrote its configuration as it started or arrived",
    "managing externally launched configuration":
        "its QEMU was started outside libvirt and attached afterwards",
}


def tainted_findings(hosts: Iterable[tuple[str, Iterable[DomainFacts]]]) -> list[Finding]:
    """``vm.tainted`` for every domain whose taints are in ``RISKY_TAINTS``, from (host name,
    the domains it reported): what `escort check` reports and the console's problem list shows."""
    out = []
    for host, domains in hosts:
        for d in domains:
            risky = risky_taints(d.taints)
            if not risky:
                continue
            said = "; ".join(f'"{text}": {meaning}' for text, meaning in risky)
            out.append(Finding(
                "vm.tainted", "warning",
                f"VM {d.name} on {host} is tainted in libvirt ({said}); escort cannot vouch for "
                "where its memory has been since it started",
                f"find who did it (the host's /var/log/libvirt/qemu/{d.name}.log and journal); the "
                "mark goes only when the VM is shut down and started again",
                vm=d.name, host=host, extra={"taints": [text for text, _ in risky]}))
    return out


def risky_taints(messages: Sequence[str]) -> list[tuple[str, str]]:
    """(libvirt's message, what it means) for each of ``messages`` in ``RISKY_TAINTS``;
    libvirt prefixes each with "tainted: ". Any other taint (host CPU model, deprecated
    settings...) says nothing about where the VM's memory has been, and is not reported."""
    out = []
    for m in messages:
        text = m.strip()
        text = text[len("tainted:"):].strip() if text.lower().startswith("tainted:") else text
        meaning = RISKY_TAINTS.get(text.lower())
        if meaning is not None:
            out.append((text, meaning))
    return out


@dataclass(frozen=True)
class Signer:
    fingerprint: str
    name: str
    not_after: dt.datetime


def signer_of(token: str) -> Signer | None:
    """The signing certificate named by a JWS's ``x5c`` header (unverified: dates only).

    Used to say *when* an owner's certificate expires; whether it is trusted is the
    verifier's business (``envelope``), which `escort check` runs separately.
    """
    try:
        head = token.strip().split(".", 1)[0]
        raw = base64.urlsafe_b64decode(head + "=" * (-len(head) % 4))
        header = json.loads(raw)
        der = base64.b64decode(header["x5c"][0], validate=True)
        cert = x509.load_der_x509_certificate(der)
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return None
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    name = str(cns[0].value) if cns else cert.subject.rfc4514_string()
    return Signer(fingerprint(cert), name, cert.not_valid_after_utc)


def impact_sentence(when: dt.datetime, lose_all: int, lose_some: int, misplaced: int) -> str:
    """"after 2026-12-06, 37 VMs lose all allowed targets" (and what else breaks)."""
    day = f"{when.astimezone(dt.UTC):%Y-%m-%d}"
    parts = []
    if lose_all:
        parts.append(f"{lose_all} VM{'s' if lose_all != 1 else ''} lose all allowed targets")
    if lose_some:
        parts.append(f"{lose_some} VM{'s' if lose_some != 1 else ''} lose some allowed targets")
    if misplaced:
        parts.append(f"{misplaced} VM{'s' if misplaced != 1 else ''} run where their policy no longer "
                     "admits them")
    if not parts:
        return f"after {day}, no VM loses an allowed target"
    return f"after {day}, " + ", ".join(parts)


__all__ = ["Finding", "Signer", "impact_sentence", "iso", "placement_reasons", "signer_of"]
