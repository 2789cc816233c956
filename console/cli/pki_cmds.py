"""``escort cert verify`` and ``escort pki init|issue-host|issue-owner``.

``cert verify`` is a stable contract (issue 2, item 9): exit 0 valid, 1 invalid
(every reason printed, one per line, with its fix), 2 unusable input (one line).
JSON: ``{"valid": bool, "reasons": [{"code", "message", ...}], "chain": [subjects
leaf..anchor], "warnings": [...], "problems": [...]}``.

``escort pki`` writes a demo CA tree laid out as::

    DIR/trust/root-ca.pem, DIR/trust/<region>-ca.pem   host CAs (the fleet's trust dir)
    DIR/owners/owners-ca.pem                            owners' CA (a separate root)
    DIR/private/<name>.key                              keys, 0600, in a 0700 folder
    DIR/trust/<name>.crl                                CRLs from `escort pki crl`

The owners' CA is its own root, not an intermediate under the host root: a host key
(which has digitalSignature) must never be able to sign placement policies.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from console.adapters import files
from console.cli.attime import parse_time
from console.core import issuance as iss
from console.core import pki
from console.core.errors import InputError

# --------------------------------------------------------------------------- demo tree (pure)

#: region name -> (country, locality, state) of the demo intermediates.
#: The certificate policies every demo regional CA asserts (and so may issue): a host's
#: placement OID counts only if every CA on its path asserts it (docs/PKI.md).
DEMO_CA_POLICIES = ("assurance:low", "assurance:medium", "assurance:high")
#: nextUpdate of the CRLs `escort pki init` writes (renew with `escort pki crl`).
INIT_CRL_DAYS = 30

DEMO_REGIONS: dict[str, tuple[str, str, str]] = {
    "eu-central": ("DE", "Frankfurt", "Hessen"),
    "eu-west": ("FR", "Paris", "Ile-de-France"),
    "us-east": ("US", "Ashburn", "Virginia"),
}
DEMO_ORG = "Escort Demo"


@dataclass(frozen=True)
class DemoCA:
    """A CA of the demo tree: its file stem (``eu-central-ca``), certificate and key."""

    stem: str
    cert: x509.Certificate
    key: iss.PrivateKey

    @property
    def issuer(self) -> iss.Issuer:
        return iss.Issuer(self.cert, self.key)


@dataclass(frozen=True)
class DemoTree:
    root: DemoCA
    regions: dict[str, DemoCA]  # "eu-central" -> CA
    owners: DemoCA

    def all(self) -> list[DemoCA]:
        return [self.root, *self.regions.values(), self.owners]


def build_demo_tree(*, key_type: str = "ec", start: dt.datetime | None = None, days: int = 3650,
                    regions: dict[str, tuple[str, str, str]] | None = None) -> DemoTree:
    """Root + one intermediate per region (pathLen 0) + a separate owners' root.

    Pure (returns objects); ``escort pki init``, the tests' fixtures and demos share it.
    """
    validity = iss.Validity.days(days, start=start)
    root_key = iss.make_key(key_type)
    root_cert = iss.issue_ca(iss.CASpec(iss.Subject("Escort Demo Root CA", organization=DEMO_ORG),
                                        path_len=1), root_key, validity)
    root = DemoCA("root-ca", root_cert, root_key)
    out: dict[str, DemoCA] = {}
    for region, (country, _locality, state) in (regions or DEMO_REGIONS).items():
        key = iss.make_key(key_type)
        spec = iss.CASpec(iss.Subject(f"Escort {region} CA", country=country, state=state,
                                      organization=DEMO_ORG, org_unit=region), path_len=0,
                          policies=DEMO_CA_POLICIES)
        out[region] = DemoCA(f"{region}-ca", iss.issue_ca(spec, key, validity, issuer=root.issuer), key)
    owners_key = iss.make_key(key_type)
    # pathLen 1: an organisation may put team CAs under it (owners send them in x5c).
    owners_cert = iss.issue_ca(iss.CASpec(iss.Subject("Escort Demo Owners CA", organization=DEMO_ORG),
                                          path_len=1), owners_key, validity)
    return DemoTree(root, out, DemoCA("owners-ca", owners_cert, owners_key))


ANY_POLICY = "2.5.29.32.0"

# --------------------------------------------------------------------------- helpers

def _reason_line(r: pki.Reason) -> str:
    fix = f" Fix: {r.fix}" if r.fix else ""
    return f"  {r.code}: {r.message}{fix}"


def _ca_paths(ca_dir: Path, name: str, *, owners: bool = False) -> tuple[Path, Path]:
    stem = name if name.endswith("-ca") else f"{name}-ca"
    cert = ca_dir / ("owners" if owners else "trust") / f"{stem}.pem"
    key = ca_dir / "private" / f"{stem}.key"
    if not cert.is_file():
        available = sorted(p.stem.removesuffix("-ca") for p in (ca_dir / "trust").glob("*-ca.pem"))
        hint = f" (available: {', '.join(available)})" if available and not owners else ""
        raise InputError(f"{cert}: no such CA certificate{hint}")
    return cert, key


def _load_issuer(cert_path: Path, key_path: Path) -> iss.Issuer:
    cert = pki.load_certificate(files.read_limited(cert_path, what="certificate"), str(cert_path))
    key = iss.load_private_key(files.read_limited(key_path, what="private key"), str(key_path))
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise InputError(f"{key_path}: this key does not belong to {cert_path}")
    if not pki.cert_info(cert, str(cert_path)).is_ca:
        raise InputError(f"{cert_path}: not a CA certificate")
    return iss.Issuer(cert, key)


def _refuse_existing(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise InputError(f"{existing[0]} already exists; use --force to overwrite")


_HOSTNAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?)+$")


def _check_hostname(value: str, what: str) -> str:
    if not _HOSTNAME.match(value):
        raise InputError(f"{what} {value!r}: not a valid DNS name")
    return value.rstrip(".")


def _subject_attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else None


# --------------------------------------------------------------------------- commands

@click.group("cert")
def cert_group() -> None:
    """Check certificates against a trust directory."""


@cert_group.command("verify")
@click.option("--trust", "trust_dir", required=True, type=click.Path(file_okay=False),
              help="Trust directory: CA certificates and CRLs (PEM or DER).")
@click.option("--at", "at_text", default=None, metavar="RFC3339-TIME",
              help="Check as of this time instead of now.")
@click.option("--owner", "as_owner", is_flag=True,
              help="Check an owner's signing certificate instead of a host certificate.")
@click.option("--missing-crl", type=click.Choice(["refuse", "warn"]), default="refuse", show_default=True,
              help="A CA that publishes no CRL at all: refuse (revocation unknown) or only warn.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("cert_file", metavar="CERT", type=click.Path(dir_okay=False))
def verify_cmd(trust_dir: str, at_text: str | None, as_owner: bool, missing_crl: str, as_json: bool,
               cert_file: str) -> None:
    """Check a host (or, with --owner, an owner) certificate; exit 0 valid, 1 invalid, 2 unusable input.

    Extra certificates after the first one in CERT (a full-chain file) may fill
    gaps between it and the trust directory. The verdict is the one every other
    command and the console use (TrustStore.verify_host / verify_owner).
    """
    at = parse_time(at_text)
    certs = pki.load_certificates(files.read_limited(cert_file, what="certificate"), cert_file)
    store, problems = files.load_trust_store(trust_dir, at,
                                             missing_crl="warn" if missing_crl == "warn" else "refuse")
    if as_owner:
        result = store.verify_owner(certs[0], certs[1:], at)
    else:
        result = store.verify_host(certs[0], at, intermediates=certs[1:])
    if as_json:
        out = result.as_json()
        out["problems"] = [{"source": p.source, **p.reason.as_json()} for p in problems]
        click.echo(json.dumps(out, indent=2))
    else:
        for p in problems:
            click.echo(f"escort: warning: {p.reason.message}", err=True)
        leaf = result.leaf.name if result.leaf else cert_file
        click.echo(f"{'valid' if result.valid else 'INVALID'}: {leaf}")
        if result.chain:
            click.echo("  chain: " + " <- ".join(c.name for c in result.chain))
        if result.policies:
            click.echo("  policies (asserted by every CA on the path): " + ", ".join(sorted(result.policies)))
        owner = result.owner_identity
        if owner is not None:
            click.echo(f"  owner: {owner.email or owner.subject}, issued by {owner.ca_name} "
                       f"(CA key SHA-256 {owner.ca_key})")
        for r in result.reasons:
            click.echo(_reason_line(r))
        for r in result.warnings:
            click.echo(_reason_line(r).replace(f"  {r.code}", f"  warning {r.code}", 1))
    sys.exit(0 if result.valid else 1)


@click.group("pki")
def pki_group() -> None:
    """Demo CA trees and certificates for hosts and owners."""


@pki_group.command("init")
@click.argument("ca_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing CA tree.")
@click.option("--key-type", type=click.Choice(iss.KEY_TYPES), default="ec", show_default=True)
@click.option("--days", type=click.IntRange(1, 36500), default=3650, show_default=True,
              help="Validity of the CA certificates.")
def init_cmd(ca_dir: str, force: bool, key_type: str, days: int) -> None:
    """Create a demo CA tree: root, regional intermediates and an owners' CA."""
    base = Path(ca_dir)
    tree = build_demo_tree(key_type=key_type, days=days)
    plan: list[tuple[Path, bytes, int]] = []
    for ca in [tree.root, *tree.regions.values()]:
        plan.append((base / "trust" / f"{ca.stem}.pem", iss.cert_pem(ca.cert), 0o644))
    plan.append((base / "owners" / f"{tree.owners.stem}.pem", iss.cert_pem(tree.owners.cert), 0o644))
    # Every CA publishes a (so far empty) CRL: revocation fails closed without one.
    crl_validity = iss.Validity.days(INIT_CRL_DAYS)
    for ca in [tree.root, *tree.regions.values()]:
        crl = iss.crl_pem(iss.issue_crl(ca.issuer, [], crl_validity))
        plan.append((base / "trust" / f"{ca.stem}.crl", crl, 0o644))
    plan.append((base / "owners" / f"{tree.owners.stem}.crl",
                 iss.crl_pem(iss.issue_crl(tree.owners.issuer, [], crl_validity)), 0o644))
    for ca in tree.all():
        plan.append((base / "private" / f"{ca.stem}.key", iss.key_pem(ca.key), 0o600))
    _refuse_existing([p for p, _, _ in plan], force)
    (base / "private").mkdir(parents=True, exist_ok=True)
    (base / "private").chmod(0o700)
    for path, data, mode in plan:  # keys first would not help: every file is written atomically
        files.atomic_write(path, data, mode=mode)
    click.echo(f"CA tree written to {base}:")
    click.echo(f"  trust dir (hosts):  {base / 'trust'}  root + {', '.join(tree.regions)}")
    click.echo(f"  owners' trust dir:  {base / 'owners'}")
    click.echo(f"  private keys:       {base / 'private'} (0600)")
    click.echo(f"  CRLs (empty) next to each CA certificate, due for renewal in {INIT_CRL_DAYS} days "
               "(`escort pki crl`)")


@pki_group.command("issue-host")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False), help="DIR of `escort pki init`.")
@click.option("--ca", "ca_name", required=True, help="Issuing CA, e.g. eu-central.")
@click.option("--hostname", required=True, help="Host name (CN and first SAN).")
@click.option("--country", default=None, help="Subject C (default: the CA's).")
@click.option("--state", default=None, help="Subject ST (default: the CA's).")
@click.option("--site", default=None, help="Subject L: site or data centre.")
@click.option("--assurance", type=click.Choice(["low", "medium", "high"]), default=None,
              help="Adds certificate policy assurance:LEVEL.")
@click.option("--policy", "policies", multiple=True, help="Extra certificate policy (name or OID).")
@click.option("--ip", "ips", multiple=True, help="IP address SAN (repeatable).")
@click.option("--dns", "dns_names", multiple=True, help="Extra DNS SAN (repeatable).")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--key-type", type=click.Choice(iss.KEY_TYPES), default="ec", show_default=True)
@click.option("--out", "prefix", required=True, help="Writes PREFIX-cert.pem and PREFIX-key.pem.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def issue_host_cmd(ca_dir: str, ca_name: str, hostname: str, country: str | None, state: str | None,
                   site: str | None, assurance: str | None, policies: tuple[str, ...], ips: tuple[str, ...],
                   dns_names: tuple[str, ...], days: int, key_type: str, prefix: str, force: bool) -> None:
    """Issue a hypervisor host certificate (TLS server and client, for QEMU)."""
    issuer = _load_issuer(*_ca_paths(Path(ca_dir), ca_name))
    hostname = _check_hostname(hostname, "--hostname")
    names = [_check_hostname(d, "--dns") for d in dns_names]
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError as exc:
            raise InputError(f"--ip {ip!r}: not an IP address") from exc
    country = country or _subject_attr(issuer.cert, NameOID.COUNTRY_NAME)
    if country is not None and not re.fullmatch(r"[A-Z]{2}", country):
        raise InputError(f"--country {country!r}: use a two-letter ISO 3166 code such as DE")
    wanted = [*([f"assurance:{assurance}"] if assurance else []), *policies]
    asserted = set(pki.cert_info(issuer.cert).policies)
    for name in wanted:
        oid = iss.resolve_policy_oid(name)  # InputError for unknown names before anything is written
        if oid.dotted_string not in asserted and ANY_POLICY not in asserted:
            raise InputError(f"--assurance/--policy {name}: CA {ca_name} does not assert this certificate "
                             "policy, so it would not count on the host; issue from a CA that asserts it")
    spec = iss.HostSpec(
        hostname=hostname, country=country,
        state=state or _subject_attr(issuer.cert, NameOID.STATE_OR_PROVINCE_NAME), locality=site,
        organization=_subject_attr(issuer.cert, NameOID.ORGANIZATION_NAME),
        org_unit=_subject_attr(issuer.cert, NameOID.ORGANIZATIONAL_UNIT_NAME),
        dns_names=names, ips=ips, policies=wanted)
    cert_path, key_path = Path(f"{prefix}-cert.pem"), Path(f"{prefix}-key.pem")
    _refuse_existing([cert_path, key_path], force)
    key = iss.make_key(key_type)
    cert = iss.issue_host(spec, key, issuer, iss.Validity.days(days))
    files.atomic_write(key_path, iss.key_pem(key), mode=0o600)
    files.atomic_write(cert_path, iss.cert_pem(cert))
    info = pki.cert_info(cert)
    click.echo(f"{cert_path}: {info.subject}, issued by {pki.cert_info(issuer.cert).name}, "
               f"valid until {info.not_after:%Y-%m-%d}")
    click.echo(f"{key_path}: private key (0600)")


@pki_group.command("issue-owner")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False), help="DIR of `escort pki init`.")
@click.option("--name", required=True, help="Owner's name (CN), e.g. 'Alice Example'.")
@click.option("--email", default=None, help="Owner's e-mail (SAN).")
@click.option("--org", default=None, help="Subject O.")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--key-type", type=click.Choice(iss.KEY_TYPES), default="ec", show_default=True)
@click.option("--out", "prefix", required=True, help="Writes PREFIX-cert.pem and PREFIX-key.pem.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def issue_owner_cmd(ca_dir: str, name: str, email: str | None, org: str | None, days: int,
                    key_type: str, prefix: str, force: bool) -> None:
    """Issue a VM owner's signing certificate (signs placement policies and grants)."""
    issuer = _load_issuer(*_ca_paths(Path(ca_dir), "owners", owners=True))
    if not name.strip():
        raise InputError("--name: must not be empty")
    if email is not None and not re.fullmatch(r"[^@\s]+@[^@\s]+", email):
        raise InputError(f"--email {email!r}: not an e-mail address")
    cert_path, key_path = Path(f"{prefix}-cert.pem"), Path(f"{prefix}-key.pem")
    _refuse_existing([cert_path, key_path], force)
    key = iss.make_key(key_type)
    cert = iss.issue_owner(iss.Subject(name.strip(), organization=org), key, issuer,
                           iss.Validity.days(days), email=email)
    files.atomic_write(key_path, iss.key_pem(key), mode=0o600)
    files.atomic_write(cert_path, iss.cert_pem(cert))
    click.echo(f"{cert_path}: owner {name.strip()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    click.echo(f"{key_path}: private key (0600)")


@pki_group.command("crl")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False), help="DIR of `escort pki init`.")
@click.option("--ca", "ca_name", required=True, help="CA whose CRL to (re)issue, e.g. eu-central or owners.")
@click.option("--revoke", "revoke", multiple=True, type=click.Path(dir_okay=False),
              help="Certificate file to add to the CRL (repeatable).")
@click.option("--days", type=click.IntRange(1, 365), default=7, show_default=True,
              help="Until nextUpdate; after that the CRL is stale and certificates it covers are refused.")
def crl_cmd(ca_dir: str, ca_name: str, revoke: tuple[str, ...], days: int) -> None:
    """Issue (or renew) a CA's CRL next to its certificate, keeping earlier revocations."""
    owners = ca_name in ("owners", "owners-ca")
    cert_path, key_path = _ca_paths(Path(ca_dir), ca_name, owners=owners)
    issuer = _load_issuer(cert_path, key_path)
    crl_path = cert_path.with_suffix(".crl")
    entries: dict[int, dt.datetime] = {}
    number = 1
    if crl_path.exists():
        old = pki.load_crl(files.read_limited(crl_path, what="CRL"), str(crl_path))
        if old.issuer != issuer.cert.subject or not old.is_signature_valid(
                issuer.cert.public_key()):  # type: ignore[arg-type]
            raise InputError(f"{crl_path}: not a CRL of {cert_path}; move it away first")
        entries = {rc.serial_number: rc.revocation_date_utc for rc in old}
        try:
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        except x509.ExtensionNotFound:
            number = 2
    now = dt.datetime.now(dt.UTC)
    for path in revoke:
        cert = pki.load_certificate(files.read_limited(path, what="certificate"), path)
        try:
            cert.verify_directly_issued_by(issuer.cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise InputError(f"{path}: not issued by {pki.cert_info(issuer.cert).name}") from exc
        entries.setdefault(cert.serial_number, now)
    crl = iss.issue_crl(issuer, sorted(entries.items()), iss.Validity.days(days, start=now), number=number)
    files.atomic_write(crl_path, iss.crl_pem(crl))
    click.echo(f"{crl_path}: CRL #{number} of {pki.cert_info(issuer.cert).name}, {len(entries)} revoked, "
               f"next update {now + dt.timedelta(days=days):%Y-%m-%d}")


def register(group: click.Group) -> None:
    """Add ``cert`` and ``pki`` to ``group``."""
    group.add_command(cert_group)
    group.add_command(pki_group)
