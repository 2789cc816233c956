"""Who is acting: proof that the operator holds the acting admin's SSH private key.

Every changing action (migrate, evacuate, drain, reconcile fix, host-key trust, guard
install, emergency declaration) calls :func:`require_admin` (or
``AdminIdentity.prove``) first. It signs a fresh random challenge with a key from the
SSH agent (``SSH_AUTH_SOCK``), ``--admin-key FILE`` or the fleet's ``identity_files``
and verifies the signature locally against the admin's ``ssh_key_fingerprint`` in the
fleet file. No proof, no action: :class:`AdminNotProven` (exit 1) with a stable
reason code and a fix naming the key that is needed, and the refusal is written to
the audit log when one is given.

The :class:`AdminProof` it returns carries the key, so the same key signs the audit
entries of the action (``SSHSIG``; see console/core/audit.py).
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from console.adapters import adminkey as ak
from console.core.errors import EscortError, InputError
from console.core.reasons import Reason
from console.services.fleet import FleetService


class AdminNotProven(EscortError):
    """The operator did not prove they hold the acting admin's key: nothing was done."""

    exit_code = 1

    def __init__(self, code: str, message: str, fix: str = "", admin: str = "") -> None:
        self.message = " ".join(message.split())
        super().__init__(f"refused ({code}): {self.message}" + (f"; fix: {fix}" if fix else "")
                         + "; nothing was changed")
        self.code = code
        self.fix = fix
        self.admin = admin

    def reason(self) -> Reason:
        return Reason(self.code, self.message, self.fix)


@dataclass(frozen=True)
class AdminProof:
    """A successful proof: made here only (``_seal``), checked by the services that act."""

    admin: str
    fingerprint: str
    source: str  # "ssh-agent" or the key file
    challenge_sha256: str
    at: dt.datetime
    certificate: str = ""
    key: ak.AdminKey | None = field(default=None, repr=False, compare=False)
    _seal: object = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        return {"admin": self.admin, "key": self.fingerprint, "source": self.source,
                "challenge_sha256": self.challenge_sha256, **({"certificate": self.certificate}
                                                             if self.certificate else {})}

    async def sign(self, message: bytes) -> str:
        """An SSHSIG (namespace ``escort-audit@escort``) of ``message`` with the admin's key."""
        if self.key is None:
            raise AdminNotProven("admin.key_missing", "no key to sign the audit entry with")
        try:
            return await self.key.sshsig(message, ak.NS_AUDIT)
        except ak.AdminKeyProblem as exc:
            raise AdminNotProven(exc.code, str(exc), exc.fix, self.admin) from exc


_SEAL = object()


def is_proof(value: object, admin: str | None = None) -> bool:
    """``value`` is a proof made by :class:`AdminIdentity` (for ``admin``, if given)."""
    return (isinstance(value, AdminProof) and value._seal is _SEAL
            and (admin is None or value.admin == admin))


@dataclass
class Availability:
    """Which admins' keys are present, and why the others' are not (the console's "Act as")."""

    present: dict[str, ak.AdminKey]
    missing: dict[str, Reason]


def terminal_prompt() -> ak.PassphrasePrompt | None:
    """A passphrase prompt when stdin is a terminal, else None (never blocks a pipeline)."""
    if not sys.stdin.isatty():
        return None
    import getpass

    return lambda text: getpass.getpass(text)


class AdminIdentity:
    """Finds admins' keys (agent, ``--admin-key``, identity files) and proves possession."""

    def __init__(self, fleet: FleetService, *, admin_key: str | None = None, agent_path: str | None = None,
                 passphrase: ak.PassphrasePrompt | None = None) -> None:
        self.fleet = fleet
        self.admin_key = admin_key
        self.agent_path = agent_path
        self.passphrase = passphrase

    def _fingerprints(self) -> dict[str, str]:
        return {a.id: a.ssh_key_fingerprint for a in self.fleet.admins}

    async def _candidates(self) -> tuple[list[ak.AdminKey], dict[str, str], list[str],
                                         ak.AdminKeyProblem | None, ak.AgentKeys]:
        """(usable keys, fingerprint -> encrypted key file, notes, --admin-key problem, agent)."""
        agent = await ak.agent_keys(self.agent_path)
        keys = list(agent.keys)
        encrypted: dict[str, str] = {}
        notes: list[str] = []
        own_problem: ak.AdminKeyProblem | None = None
        if agent.problem is not None:
            notes.append(str(agent.problem))
        else:
            notes.append(f"the SSH agent holds {len(agent.keys)} key(s)")
        files: list[tuple[str, bool]] = []
        if self.admin_key:
            files.append((self.admin_key, True))
        spec = self.fleet.spec
        files += [(f, False) for f in (spec.identity_files if spec else ())]
        for path, explicit in files:
            try:
                keys.append(ak.load_key_file(path, passphrase=None))
            except ak.AdminKeyProblem as exc:
                if exc.code == "admin.key_encrypted":
                    fp = _public_fingerprint(path)
                    if fp:
                        encrypted[fp] = path
                if explicit:
                    own_problem = exc
                elif exc.code != "admin.key_encrypted":
                    notes.append(str(exc))
        return keys, encrypted, notes, own_problem, agent

    async def available(self) -> Availability:
        """Admins whose key is present (agent or files), and a reason for each other admin."""
        keys, encrypted, notes, own, agent = await self._candidates()
        agent.close()
        present: dict[str, ak.AdminKey] = {}
        missing: dict[str, Reason] = {}
        for admin, fp in self._fingerprints().items():
            hit = ak.matching(keys, fp) if fp else None
            if hit is not None:
                present[admin] = hit
            else:
                missing[admin] = self._missing(admin, fp, notes, own, encrypted, interactive=False).reason()
        return Availability(present, missing)

    def _missing(self, admin: str, fp: str, notes: list[str], own: ak.AdminKeyProblem | None,
                 encrypted: Mapping[str, str], *, interactive: bool) -> AdminNotProven:
        if not fp:
            return AdminNotProven("admin.no_fingerprint",
                                  f"admin {admin!r} has no ssh_key_fingerprint in the fleet file",
                                  "add the admin's key fingerprint (ssh-keygen -lf KEY.pub) to [[admins]]",
                                  admin)
        if fp in encrypted and not interactive:
            path = encrypted[fp]
            return AdminNotProven("admin.key_encrypted",
                                  f"admin {admin}'s key {path} is encrypted and no passphrase prompt is "
                                  "available", f"ssh-add {path} (then the agent signs), or run on a terminal",
                                  admin)
        if own is not None:
            return AdminNotProven(own.code, f"--admin-key: {own}", own.fix or f"give the key {fp}", admin)
        no_agent = any("SSH_AUTH_SOCK" in n or "agent at" in n for n in notes)
        code = "admin.no_agent" if no_agent and not self.admin_key and not (
            self.fleet.spec and self.fleet.spec.identity_files) else "admin.key_missing"
        where = "; ".join(notes)
        return AdminNotProven(code, f"admin {admin}'s key {fp} is not present ({where}, "
                              f"and no key file given holds it)",
                              f"ssh-add the private key with fingerprint {fp}, or pass --admin-key FILE",
                              admin)

    async def prove(self, admin: str | None, action: str = "") -> AdminProof:
        """Prove possession of ``admin``'s key (or, when None, the one admin whose key is here)."""
        fps = self._fingerprints()
        if not fps:
            raise AdminNotProven("admin.unknown", "the fleet file lists no [[admins]]: nobody can act",
                                 "add the admin (id and ssh_key_fingerprint) to the fleet file")
        if admin is not None and admin not in fps:
            raise AdminNotProven("admin.unknown", f"admin {admin!r} is not in the fleet file's [[admins]]",
                                 "add the admin (id and ssh_key_fingerprint) to the fleet file", admin)
        keys, encrypted, notes, own, agent = await self._candidates()
        try:
            if admin is None:
                here = [a for a, fp in fps.items() if fp and (ak.matching(keys, fp) or fp in encrypted)]
                if len(here) == 1:
                    admin = here[0]
                elif len(here) > 1:
                    raise InputError(f"the keys of {len(here)} admins are present ({', '.join(here)}): "
                                     "name the one acting with --admin")
                elif own is not None:
                    # the --admin-key FILE given is the reason no key is here: say so, not "no key"
                    raise AdminNotProven(own.code, f"--admin-key: {own}", own.fix or "give the admin's key")
                else:
                    listed = ", ".join(f"{a} ({fp or 'no fingerprint'})" for a, fp in fps.items())
                    raise AdminNotProven("admin.key_missing",
                                         f"no admin's key is present ({'; '.join(notes)}); "
                                         f"the fleet's admins: {listed}",
                                         "ssh-add your admin key, or pass --admin-key FILE")
            fp = fps[admin]
            key = ak.matching(keys, fp) if fp else None
            if key is None and fp in encrypted and self.passphrase is not None:
                try:
                    key = ak.load_key_file(encrypted[fp], passphrase=self.passphrase)
                except ak.AdminKeyProblem as exc:
                    raise AdminNotProven(exc.code, str(exc), exc.fix, admin) from exc
            if key is None:
                raise self._missing(admin, fp, notes, own, encrypted, interactive=False)
            try:
                challenge = await ak.prove(key, fp)
            except ak.AdminKeyProblem as exc:
                raise AdminNotProven(exc.code, f"admin {admin}: {exc}", exc.fix, admin) from exc
            return AdminProof(admin, fp, key.source, challenge, dt.datetime.now(dt.UTC), key.certificate,
                              key, _SEAL)
        finally:
            agent.close()


def _public_fingerprint(path: str) -> str:
    """The fingerprint in ``path.pub`` (to know an encrypted key's identity without its passphrase)."""
    pub = Path(str(Path(path).expanduser()) + ".pub")
    if not pub.is_file():  # a named pipe there must not hang the search for keys
        return ""
    try:
        import asyncssh

        return str(asyncssh.read_public_key(str(pub)).get_fingerprint("sha256"))
    except Exception:  # no .pub, or unreadable: the key stays unknown
        return ""


AuditAppend = Callable[[dict[str, Any]], Any]


async def sign_entry(audit: Any, entry: Mapping[str, Any], proof: AdminProof) -> dict[str, Any]:
    """Append a ``signature`` entry: the admin's SSHSIG over the exact text of ``entry``'s line.

    ``audit`` is an adapters.audit.AuditLog; ``entry`` what its ``append`` returned.
    ``ssh-keygen -Y verify -n escort-audit@escort`` accepts the signature over that line.
    """
    import asyncio

    from console.core.audit import canonical_line, signature_fields

    line = canonical_line(entry)
    armored = await proof.sign(line.encode("utf-8"))
    fields = signature_fields(line, entry, admin=proof.admin, key=proof.fingerprint, sshsig=armored)
    written: dict[str, Any] = await asyncio.to_thread(audit.append, fields)
    return written


async def append_signed(audit: Any, fields: Mapping[str, Any], proof: AdminProof | None) -> dict[str, Any]:
    """Append ``fields`` (fsynced) and, with a proof, the admin's signature over it."""
    import asyncio

    entry: dict[str, Any] = await asyncio.to_thread(audit.append, dict(fields))
    if proof is not None:
        await sign_entry(audit, entry, proof)
    return entry


async def require_admin(fleet: FleetService, action: str, *, admin: str | None = None,
                        identity: AdminIdentity | None = None, audit: AuditAppend | None = None,
                        writable: bool = True, clock_check: Callable[[], None] | None = None) -> AdminProof:
    """The gate of every changing action: read-only check, then proof of possession.

    ``audit`` (an async or sync append of one entry) records a refusal before it is
    raised. Use it from any service that changes something (e.g. the guard install).
    """
    import inspect

    if writable:
        fleet.require_writable(action)
    ident = identity or AdminIdentity(fleet)
    try:
        if clock_check is not None:
            clock_check()
        return await ident.prove(admin, action)
    except AdminNotProven as exc:
        if audit is not None:
            entry = {"kind": "refusal", "action": action, "admin": exc.admin or admin or "",
                     "code": exc.code, "message": exc.message}
            result = audit(entry)
            if inspect.isawaitable(result):
                await result
        raise


#: How far the local clock may be behind the newest audit entry before actions are refused.
CLOCK_BEHIND_S = 300.0


def clock_check_against(last_ts: str, now: dt.datetime | None = None) -> None:
    """Refuse when this machine's clock is far behind the audit log's newest entry.

    The log's timestamps come from the clocks of every console that wrote to it; a
    clock minutes behind the newest of them is wrong, and time-limited grants and
    certificates would be judged at the wrong time.
    """
    if not last_ts:
        return
    try:
        newest = dt.datetime.strptime(last_ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    except ValueError:
        return
    current = now or dt.datetime.now(dt.UTC)
    behind = (newest - current).total_seconds()
    if behind > CLOCK_BEHIND_S:
        raise AdminNotProven("time.clock_off",
                             f"this machine's clock ({current:%Y-%m-%d %H:%M:%S} UTC) is {int(behind)} s "
                             f"behind the newest audit entry ({last_ts})",
                             "fix the clock (timedatectl / NTP), then try again")


def default_identity(fleet: FleetService) -> AdminIdentity:
    """Agent + identity files; a passphrase prompt only on a terminal (env ESCORT_ADMIN_KEY: --admin-key)."""
    return AdminIdentity(fleet, admin_key=os.environ.get("ESCORT_ADMIN_KEY") or None,
                         passphrase=terminal_prompt())


__all__ = ["AdminIdentity", "AdminNotProven", "AdminProof", "Availability", "append_signed",
           "default_identity", "is_proof", "require_admin", "sign_entry", "terminal_prompt"]
