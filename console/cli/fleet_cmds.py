"""``escort explain``, ``escort targets``, ``escort policy ...`` and ``escort grant ...``.

Exit codes are a contract: 0 allowed / valid, 1 refused / invalid, 2 unusable input
(one line on stderr, never a traceback — the group turns ``InputError`` into that).
The JSON shapes are a contract too (see docs/FLEET.md).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from console.adapters import files
from console.cli import finish
from console.cli.attime import parse_time
from console.core import envelope as env
from console.core import grants as gr
from console.core import pki
from console.core import policy as pol
from console.core.decisions import Decision
from console.core.errors import InputError
from console.core.pki import load_certificates
from console.core.reasons import Reason
from console.services.fleet import FleetService

if TYPE_CHECKING:
    from console.core import issuance as iss


def _fleet_path(ctx: click.Context, fleet: str | None) -> str:
    """``--fleet`` on the sub-command, else on the ``escort`` group."""
    if fleet:
        return fleet
    parent = ctx.find_root().params.get("fleet_file")
    if parent:
        return str(parent)
    raise InputError("no fleet file: pass --fleet FILE")


def _reason_lines(reasons: Any, indent: str = "  ") -> list[str]:
    out = []
    for r in reasons:
        tag = "warning " if r.severity == "warning" else ""
        out.append(f"{indent}{tag}{r.code}: {r.message}")
        if r.fix:
            out.append(f"{indent}  fix: {r.fix}")
    return out


def _mark(ok: bool | None) -> str:
    return {True: "[ok]  ", False: "[FAIL]", None: "[ -- ]"}[ok]


def _print_decision(d: Decision) -> None:
    verdict = "ALLOWED" if d.allowed else "REFUSED"
    who = f" by {d.admin}" if d.admin else ""
    click.echo(f"{verdict}: {d.vm} -> {d.host}{who} at {d.at:%Y-%m-%d %H:%M} UTC")
    for s in d.steps:
        click.echo(f"  {_mark(s.ok)} {s.title}: {s.detail}")
    errors = [r for r in d.reasons if r.severity != "warning"]
    if errors:
        click.echo(f"Reasons ({len(errors)}):")
    for line in _reason_lines(d.reasons):
        click.echo(line)


def _live_opts(fn: Any) -> Any:
    return click.option("--offline", is_flag=True,
                        help="Do not reach the hosts: use only the fleet file and local certificates.")(fn)


def _load_live(path: str, at: dt.datetime | None, offline: bool, vm: str) -> FleetService:
    """The fleet, with every host's VMs and certificate read live unless ``offline``.

    VMs of lab and real fleets live in libvirt, not in the fleet file, so a question
    about them needs one refresh (concurrent, bounded; a host that cannot be reached
    becomes a reason on that host, never an error). Offline, only ``vm``'s records are
    kept (the whole fleet file is still checked).
    """
    service = FleetService.load_strict(path, at=at, only_vm=vm if offline else None)
    if not offline and service.spec is not None and service.spec.hosts:
        import asyncio
        import gc

        gc.enable()  # a refresh runs for a while (see console/cli/__init__.py NO_GC)

        from console.services.inventory import refresh_fleet  # asyncssh/libvirt: only when needed

        asyncio.run(refresh_fleet(service))
    return service


def _cache_notices() -> None:
    """Say once, on stderr, that a cache could not be written (the answer is the same)."""
    from console.adapters import parsecache

    for notice in parsecache.notices:
        click.echo(f"escort: {notice}", err=True)
    parsecache.notices.clear()


def _fleet_opts(fn: Any) -> Any:
    fn = click.option("--fleet", "fleet", type=click.Path(dir_okay=False), default=None,
                      help="Fleet file (TOML), see docs/FLEET.md.")(fn)
    fn = click.option("--at", "at_text", default=None, metavar="RFC3339-TIME",
                      help="Decide as of this time instead of now.")(fn)
    fn = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(fn)
    return fn


@click.command("explain")
@_fleet_opts
@click.option("--admin", default=None, metavar="ID", help="Also check this admin's grant.")
@click.option("--emergency", is_flag=True, help="Decide as for an evacuation (emergency-only grants count).")
@_live_opts
@click.argument("vm", metavar="VM")
@click.argument("host", metavar="HOST")
@click.pass_context
def explain_cmd(ctx: click.Context, fleet: str | None, at_text: str | None, as_json: bool,
                admin: str | None, emergency: bool, offline: bool, vm: str, host: str) -> None:
    """Why VM (UUID or name) may or may not move to HOST; exit 0 allowed, 1 refused, 2 bad input.

    Exit 4 when the VM was not found and some hosts could not be reached (it may be on one).
    """
    at = parse_time(at_text)
    service = _load_live(_fleet_path(ctx, fleet), at, offline, vm)
    d = service.explain(vm, host, admin, at, emergency=emergency)
    _cache_notices()
    if as_json:
        click.echo(json.dumps(d.as_json(), indent=2))
    else:
        _print_decision(d)
    finish(0 if d.allowed else 1, at_once=offline)


@click.command("targets")
@_fleet_opts
@click.option("--admin", default=None, metavar="ID", help="Also check this admin's grant.")
@_live_opts
@click.argument("vm", metavar="VM")
@click.pass_context
def targets_cmd(ctx: click.Context, fleet: str | None, at_text: str | None, as_json: bool,
                admin: str | None, offline: bool, vm: str) -> None:
    """Every host VM may move to, and why each other host is refused.

    Exit 0 when at least one host is allowed, 1 when none is, 2 on bad input, 4 when the
    VM was not found and some hosts could not be reached (it may be on one of them).
    """
    at = parse_time(at_text)
    service = _load_live(_fleet_path(ctx, fleet), at, offline, vm)
    # offline only: after a refresh, connection libraries may have threads of their own
    decisions = service.targets(vm, admin, at, workers=(os.cpu_count() or 1) if offline else 1)
    _cache_notices()
    allowed = [d.host for d in decisions if d.allowed]
    refused = [d for d in decisions if not d.allowed]
    if as_json:
        vm_label = decisions[0].vm if decisions else vm
        click.echo(json.dumps({
            "vm": vm_label,
            "allowed": allowed,
            "refused": [{"host": d.host, "reasons": [r.as_json() for r in d.reasons]} for d in refused],
        }, indent=2))
    else:
        name = decisions[0].vm if decisions else vm
        click.echo(f"{name}: {len(allowed)} of {len(decisions)} host(s) allowed")
        for h in allowed:
            click.echo(f"  allowed  {h}")
        for d in refused:
            click.echo(f"  refused  {d.host}")
            for line in _reason_lines(d.reasons, "    "):
                click.echo(line)
    finish(0 if allowed else 1, at_once=offline)


# --------------------------------------------------------------------------- signing helpers

def _load_signer(key_path: str, cert_path: str, chain_paths: tuple[str, ...]) -> tuple[
        iss.PrivateKey, list[x509.Certificate], env.OwnerIdentity]:
    from console.core import issuance as iss  # signing only: explain/targets need not import it

    key = iss.load_private_key(files.read_limited(key_path, what="private key"), key_path)
    certs = load_certificates(files.read_limited(cert_path, what="certificate"), cert_path)
    for extra in chain_paths:
        certs += load_certificates(files.read_limited(extra, what="certificate"), extra)
    env.alg_for_key(key)  # refuses unsupported keys with one line
    owner = env.owner_identity(certs[0])
    return key, certs, owner


def _write_token(out: str, token: str, force: bool) -> None:
    p = Path(out)
    if p.exists() and not force:
        raise InputError(f"{out} already exists; use --force to overwrite")
    files.atomic_write(p, (token + "\n").encode("ascii"))


def _window(start_text: str | None, length: dt.timedelta) -> tuple[dt.datetime, dt.datetime]:
    start = parse_time(start_text).replace(microsecond=0)
    try:
        return start, start + length
    except OverflowError as exc:
        raise InputError(f"--start {start_text}: the validity window would end after year 9999") from exc


def _trusted_ca(value: str) -> tuple[str, str]:
    """``NAME=SHA256`` or the path of a CA certificate (its CN and fingerprint are used)."""
    name, sep, fp = value.partition("=")
    if sep:
        if not name.strip():
            raise InputError(f"--trust-ca {value!r}: the name before '=' is empty")
        return name.strip(), pol.normalize_fingerprint(fp)
    if Path(value).is_file():
        cert = load_certificates(files.read_limited(value, what="certificate"), value)[0]
        info = pki.cert_info(cert, value)
        if not info.is_ca:
            raise InputError(f"--trust-ca {value}: not a CA certificate")
        return info.name, info.fingerprint
    raise InputError(f"--trust-ca {value!r}: expected NAME=SHA256-FINGERPRINT or a CA certificate file")


def _signer_opts(fn: Any) -> Any:
    fn = click.option("--force", is_flag=True, help="Overwrite an existing output file.")(fn)
    fn = click.option("--out", required=True, type=click.Path(dir_okay=False),
                      help="Where to write the token.")(fn)
    fn = click.option("--start", "start_text", default=None, metavar="RFC3339-TIME",
                      help="Valid from (default: now).")(fn)
    fn = click.option("--chain", "chain_paths", multiple=True, type=click.Path(dir_okay=False),
                      help="Intermediate CA certificate(s) for x5c (repeatable).")(fn)
    fn = click.option("--cert", "cert_path", required=True, type=click.Path(dir_okay=False),
                      help="Owner certificate (PEM), from the owners' CA.")(fn)
    fn = click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False),
                      help="Owner private key (PEM, unencrypted).")(fn)
    return fn


def _read_token(path: str) -> str:
    text = files.read_limited(path, what="token", limit=env.MAX_TOKEN_BYTES).decode("ascii", "replace")
    if text.lstrip().startswith("<"):
        token = pol.token_from_metadata_xml(text)
        if not token:
            raise InputError(f"{path}: domain XML without an escort policy")
        return token
    return text.strip()


def _print_verified(kind: str, path: str, header: dict[str, Any], payload: dict[str, Any],
                    reasons: tuple[Reason, ...], owner: env.OwnerIdentity | None, digest: str,
                    as_json: bool) -> None:
    valid = not [r for r in reasons if r.severity != "warning"]
    if as_json:
        click.echo(json.dumps({
            "valid": valid, "digest": digest, "header": {k: v for k, v in header.items() if k != "x5c"},
            "owner": {"name": owner.name, "email": owner.email, "fingerprint": owner.fingerprint,
                      "issuer": owner.issuer, "issuer_key": owner.issuer_key} if owner else None,
            "payload": payload, "reasons": [r.as_json() for r in reasons],
        }, indent=2))
        return
    click.echo(f"{'valid' if valid else 'INVALID'} {kind}: {path}")
    if owner:
        click.echo(f"  signed by {owner.full_label()} (certificate {owner.fingerprint[:16]}…), "
                   f"{header.get('alg')}")
    click.echo(f"  digest sha256:{digest}")
    for k in sorted(payload):
        value = payload[k]
        if k in {"nbf", "exp", "iat"} and isinstance(value, int) and 0 <= value <= env.MAX_TIMESTAMP:
            click.echo(f"  {k}: {dt.datetime.fromtimestamp(payload[k], dt.UTC):%Y-%m-%d %H:%M:%S} UTC")
        else:
            click.echo(f"  {k}: {json.dumps(payload[k])}")
    for line in _reason_lines(reasons):
        click.echo(line)


# --------------------------------------------------------------------------- policy

@click.group("policy")
def policy_group() -> None:
    """Owner-signed placement policies (JWS) that travel with a VM."""


@policy_group.command("sign")
@_signer_opts
@click.option("--vm-uuid", required=True, help="The VM's libvirt UUID.")
@click.option("--vm-name", default="", help="The VM's name (informational).")
@click.option("--trust-ca", "trust_cas", multiple=True, required=True, metavar="NAME=SHA256|CA-CERT",
              help="A CA whose hosts may run the VM (repeatable); an intermediate admits only its hosts.")
@click.option("--require", "requires", multiple=True, metavar="KEY=V1,V2",
              help="Required host attribute: country, state, site/locality, org, org_unit, "
                   "policy (all listed policies required). Repeatable.")
@click.option("--label", "labels", multiple=True, help="Label grants may refer to (repeatable).")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--seq", type=click.IntRange(0, pol.MAX_SEQ), default=None,
              help="Sequence number; a VM never accepts a lower one than it has seen "
                   "(default: the start time in seconds since 1970).")
@click.option("--handover", "handover_path", default=None, type=click.Path(dir_okay=False),
              help="The previous owner's hand-over of this VM (`escort policy handover`).")
def policy_sign_cmd(key_path: str, cert_path: str, chain_paths: tuple[str, ...], start_text: str | None,
                    out: str, force: bool, vm_uuid: str, vm_name: str, trust_cas: tuple[str, ...],
                    requires: tuple[str, ...], labels: tuple[str, ...], days: int, seq: int | None,
                    handover_path: str | None) -> None:
    """Sign a placement policy for one VM with the owner's key."""
    key, chain, owner = _load_signer(key_path, cert_path, chain_paths)
    start, end = _window(start_text, dt.timedelta(days=days))
    handover = _read_token(handover_path) if handover_path else ""
    payload = pol.build_policy_payload(
        owner=owner.email or owner.name, vm_uuid=vm_uuid, vm_name=vm_name,
        trusted_cas=[_trusted_ca(v) for v in trust_cas], require=pol.parse_requirements(requires),
        not_before=start, not_after=end, labels=labels, seq=seq, handover=handover)
    token = pol.sign_policy(payload, key, chain)
    _write_token(out, token, force)
    click.echo(f"policy for {payload['vm_uuid']} signed by {owner.label()}, valid until "
               f"{end:%Y-%m-%d %H:%M} UTC: {out}")


@policy_group.command("handover")
@_signer_opts
@click.option("--vm-uuid", required=True, help="The VM being handed over.")
@click.option("--to-cert", "to_cert", required=True, type=click.Path(dir_okay=False),
              help="The new owner's certificate (PEM): its e-mail (else subject) is named.")
@click.option("--to-ca", "to_ca", required=True, type=click.Path(dir_okay=False),
              help="The owners' CA certificate that issued --to-cert (its key is named).")
@click.option("--days", type=click.IntRange(1, 3650), default=30, show_default=True)
def policy_handover_cmd(key_path: str, cert_path: str, chain_paths: tuple[str, ...], start_text: str | None,
                        out: str, force: bool, vm_uuid: str, to_cert: str, to_ca: str, days: int) -> None:
    """Hand one VM over to another owner (signed by the current owner).

    The new owner passes the file to `escort policy sign --handover`; escort then
    accepts the new owner's policy for a VM whose policies the current owner signed.
    """
    key, chain, owner = _load_signer(key_path, cert_path, chain_paths)
    new = load_certificates(files.read_limited(to_cert, what="certificate"), to_cert)[0]
    ca = load_certificates(files.read_limited(to_ca, what="certificate"), to_ca)[0]
    if new.issuer != ca.subject:
        raise InputError(f"{to_ca}: not the CA that issued {to_cert} (its issuer is "
                         f"{new.issuer.rfc4514_string()})")
    try:
        new.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise InputError(f"{to_cert}: not signed by the key of {to_ca}") from exc
    who = env.owner_identity(new)
    start, end = _window(start_text, dt.timedelta(days=days))
    payload = pol.build_handover_payload(owner=owner.email or owner.name, vm_uuid=vm_uuid,
                                         to=who.email or who.subject, to_ca=env.spki_sha256(ca),
                                         not_before=start, not_after=end)
    token = pol.sign_handover(payload, key, chain)
    _write_token(out, token, force)
    click.echo(f"hand-over of {payload['vm_uuid']} from {owner.label()} to {who.label()}, valid until "
               f"{end:%Y-%m-%d %H:%M} UTC: {out}")


@policy_group.command("show")
@click.option("--owners", "owners_dir", type=click.Path(file_okay=False), default=None,
              help="Owners' trust directory (without it the signer cannot be trusted).")
@click.option("--vm-uuid", default=None, help="Check that the policy is for this VM.")
@click.option("--at", "at_text", default=None, metavar="RFC3339-TIME")
@click.option("--json", "as_json", is_flag=True)
@click.argument("path", metavar="FILE")
def policy_show_cmd(owners_dir: str | None, vm_uuid: str | None, at_text: str | None, as_json: bool,
                    path: str) -> None:
    """Decode and verify a policy (token file or domain/metadata XML); exit 0 valid, 1 invalid."""
    at = parse_time(at_text)
    token = _read_token(path)
    header, payload = env.decode_unverified(token)
    owners = files.load_trust_store(owners_dir, at)[0] if owners_dir else None
    expected = pol.normalize_uuid(vm_uuid) if vm_uuid else None
    result = pol.PolicyBook(owners).verify(token, at, vm_uuid=expected)
    reasons = result.reasons + result.warnings
    _print_verified("policy", path, header, payload, reasons, result.owner, result.digest, as_json)
    sys.exit(0 if result.valid else 1)


@policy_group.command("xml")
@click.argument("path", metavar="FILE")
def policy_xml_cmd(path: str) -> None:
    """Print the <metadata> element for virsh metadata / virDomainSetMetadata."""
    click.echo(pol.policy_metadata_xml(_read_token(path)))


# --------------------------------------------------------------------------- grant

@click.group("grant")
def grant_group() -> None:
    """Owner-signed, time-limited migration grants for admins."""


@grant_group.command("issue")
@_signer_opts
@click.option("--admin", "admin_id", required=True, metavar="ID",
              help="The admin's id (as in the fleet file).")
@click.option("--admin-key-fp", default="", metavar="SHA256:...",
              help="Admin's SSH key fingerprint (required).")
@click.option("--admin-cert-fp", default="", metavar="SHA256",
              help="Admin's certificate fingerprint (only narrows the grant; --admin-key-fp is required).")
@click.option("--vm", "vms", multiple=True, metavar="UUID", help="A VM the grant covers (repeatable).")
@click.option("--label", default="", help="Cover every VM of this owner whose policy has this label.")
@click.option("--emergency-only", is_flag=True, help="Valid only for evacuations.")
@click.option("--hours", type=click.FloatRange(0.01, 24 * 90), default=8, show_default=True)
def grant_issue_cmd(key_path: str, cert_path: str, chain_paths: tuple[str, ...], start_text: str | None,
                    out: str, force: bool, admin_id: str, admin_key_fp: str, admin_cert_fp: str,
                    vms: tuple[str, ...], label: str, emergency_only: bool, hours: float) -> None:
    """Issue a grant letting one admin migrate the owner's VMs for a while."""
    key, chain, owner = _load_signer(key_path, cert_path, chain_paths)
    start, end = _window(start_text, dt.timedelta(hours=hours))
    payload = gr.build_grant_payload(
        owner=owner.email or owner.name, admin=gr.AdminRef(admin_id, admin_key_fp, admin_cert_fp),
        vms=vms, label=label, not_before=start, not_after=end, emergency_only=emergency_only)
    token = gr.sign_grant(payload, key, chain)
    _write_token(out, token, force)
    scope = f"{len(payload.get('vms', []))} VM(s)" + (f" + label {label!r}" if label else "")
    click.echo(f"grant for {admin_id} ({scope}) signed by {owner.label()}, valid until "
               f"{end:%Y-%m-%d %H:%M} UTC{' (emergency only)' if emergency_only else ''}: {out}")


@grant_group.command("show")
@click.option("--owners", "owners_dir", type=click.Path(file_okay=False), default=None,
              help="Owners' trust directory (without it the signer cannot be trusted).")
@click.option("--at", "at_text", default=None, metavar="RFC3339-TIME")
@click.option("--json", "as_json", is_flag=True)
@click.argument("path", metavar="FILE")
def grant_show_cmd(owners_dir: str | None, at_text: str | None, as_json: bool, path: str) -> None:
    """Decode and verify a grant; exit 0 valid, 1 invalid."""
    at = parse_time(at_text)
    token = _read_token(path)
    header, payload = env.decode_unverified(token)
    owners = files.load_trust_store(owners_dir, at)[0] if owners_dir else None
    result = gr.GrantBook(owners).verify(token, at, path)
    _print_verified("grant", path, header, payload, result.reasons, result.owner, result.digest, as_json)
    sys.exit(0 if result.valid else 1)


def register(group: click.Group) -> None:
    """Add ``explain``, ``targets``, ``policy`` and ``grant`` to ``group``."""
    for cmd in (explain_cmd, targets_cmd, policy_group, grant_group):
        group.add_command(cmd)
