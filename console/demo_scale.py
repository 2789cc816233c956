"""A large *offline* demo fleet: ``escort demo --vms 10000 --hosts 1000``.

For trying escort at scale (and for ``bench/bench_scale.py``): every file is made
with escort's own code paths — the CA tree, host certificates and CRLs by
core/issuance.py, owner-signed ES256 placement policies by core/policy.py, grants by
core/grants.py — and laid out exactly as a user would: one fleet file with the
documented ``[[hosts]]`` / ``[[vms]]`` tables, one certificate file per host, one
policy file per VM, trust directories with CRLs.

The hosts have no SSH address and no libvirt URI of their own: the fleet is
offline (decisions come from the files; nothing is contacted, nothing migrates).

What is in it, so the console has something to explain at every size:

* a root CA, ten regional intermediates (each with a CRL, some hosts revoked) and a
  rogue CA outside the tree that issued ~1% of the host certificates;
* ~2% expired host certificates; hosts spread over 24 countries and 40 sites with
  assurance low/medium/high;
* 50 owners (ES256 keys) with 300 distinct placement rules; ~0.5% of the VMs have no
  policy; one admin with a grant per owner;
* most VMs run on a host their policy admits (about 2% on one it refuses, so the
  console's placement check has something to report).

Generation time (setup only, not part of any measured figure): about 1 s per 1,000
host certificates and 2-3 s per 10,000 policies on a 2-core machine. All hosts share
one key pair (their certificates differ); a chain check does not depend on it.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from console.adapters.files import replace_dir
from console.core import grants as grants_mod
from console.core import issuance as iss
from console.core import policy as policy_mod
from console.core.envelope import fingerprint
from console.core.errors import InputError

REGIONS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("eu-central", ("DE", "AT", "CH"), ("Frankfurt", "Berlin", "Vienna", "Zurich")),
    ("eu-west", ("FR", "BE", "NL"), ("Paris", "Brussels", "Amsterdam", "Lyon")),
    ("eu-north", ("SE", "FI", "DK"), ("Stockholm", "Helsinki", "Copenhagen")),
    ("eu-south", ("IT", "ES", "PT"), ("Milan", "Madrid", "Lisbon", "Rome")),
    ("uk", ("GB", "IE"), ("London", "Dublin", "Manchester")),
    ("us-east", ("US",), ("Ashburn", "New York", "Atlanta")),
    ("us-west", ("US",), ("Portland", "San Jose", "Phoenix")),
    ("ca", ("CA",), ("Montreal", "Toronto", "Vancouver")),
    ("apac", ("JP", "SG", "AU", "KR"), ("Tokyo", "Singapore", "Sydney", "Seoul", "Osaka")),
    ("latam", ("BR", "CL", "MX"), ("Sao Paulo", "Santiago", "Queretaro", "Rio")),
)
ASSURANCE = ("assurance:low", "assurance:medium", "assurance:high")
MAX_VMS = 100_000
#: VMs the fleet file itself lists; more go into vms/*.toml files (vm_files) of this many.
VMS_PER_FILE = 10_000
MAX_HOSTS = 10_000
STAMP = "scale.json"
#: bumped when escort's rules need the generated files to change (an older fleet is remade)
VERSION = 3

Progress = Callable[[str], None]


def _name_width(n: int) -> int:
    return max(4, len(str(n)))


def generate_scale(dest: Path, *, vms: int, hosts: int, at: dt.datetime | None = None, seed: int = 1,
                   owners: int = 50, rules: int = 300, progress: Progress | None = None) -> Path:
    """Write an offline fleet of ``vms`` VMs on ``hosts`` hosts into ``dest`` (replaced as
    a whole; written beside it first, so an interrupted run leaves nothing half-made).
    Returns the fleet file."""
    if not 1 <= hosts <= MAX_HOSTS:
        raise InputError(f"--hosts must be 1..{MAX_HOSTS:,}, not {hosts}")
    if not 0 <= vms <= MAX_VMS:
        raise InputError(f"--vms must be 0..{MAX_VMS:,}, not {vms}")
    say = progress or (lambda _text: None)
    now = (at or dt.datetime.now(dt.UTC)).replace(microsecond=0)
    def fill(work: Path) -> None:
        _write(work, now, vms, hosts, seed, max(1, owners), max(1, rules), say)

    return replace_dir(dest, fill, prefix=".scale-") / "fleet.toml"


def _write(work: Path, now: dt.datetime, n_vms: int, n_hosts: int, seed: int, n_owners: int,
           n_rules: int, say: Progress) -> None:
    rng = random.Random(seed)
    start = now - dt.timedelta(days=100)
    files: dict[str, bytes] = {}

    def put(rel: str, data: bytes) -> None:
        files[rel] = data

    say(f"CA tree: root, {len(REGIONS)} regional intermediates, a rogue CA")
    root_key = iss.make_key("ec")
    root_spec = iss.CASpec(iss.Subject("Scale Demo Root CA", "DE", organization="Scale Demo"))
    root = iss.Issuer(iss.issue_ca(root_spec, root_key, iss.Validity(start, now + dt.timedelta(days=3650))),
                      root_key)
    put("trust/root-ca.pem", iss.cert_pem(root.cert))
    put("trust/root-ca.crl.pem", iss.crl_pem(iss.issue_crl(root, [], _crl_window(now))))
    regions: list[tuple[iss.Issuer, tuple[str, ...], tuple[str, ...], str]] = []
    for name, countries, sites in REGIONS:
        key = iss.make_key("ec")
        # the regional CAs assert every assurance level they issue (a host's placement
        # OID counts only if every CA on its path asserts it; docs/PKI.md)
        cert = iss.issue_ca(iss.CASpec(iss.Subject(f"Scale {name} CA", organization="Scale Demo",
                                                   org_unit=name), path_len=0, policies=ASSURANCE),
                            key, iss.Validity(start, now + dt.timedelta(days=1825)), issuer=root)
        regions.append((iss.Issuer(cert, key), countries, sites, name))
        put(f"trust/{name}-ca.pem", iss.cert_pem(cert))
    rogue_key = iss.make_key("ec")
    rogue = iss.Issuer(iss.issue_ca(iss.CASpec(iss.Subject("Rogue CA")), rogue_key,
                                    iss.Validity(start, now + dt.timedelta(days=3650))), rogue_key)

    say(f"{n_hosts:,} host certificates")
    host_key = iss.make_key("ec")
    width = _name_width(n_hosts)
    host_names: list[str] = []
    host_facts: list[tuple[str, str, str, str, bool]] = []  # (region CA or "", country, site, assurance, ok)
    host_entries: list[dict[str, Any]] = []
    revoked: dict[str, list[tuple[int, dt.datetime]]] = {r[3]: [] for r in regions}
    for i in range(n_hosts):
        issuer, countries, sites, region = regions[i % len(regions)]
        name = f"hv-{i:0{width}d}"
        if i % 97 == 96:
            issuer = rogue
        expired = i % 53 == 52
        validity = (iss.Validity(now - dt.timedelta(days=400), now - dt.timedelta(days=2)) if expired
                    else iss.Validity(start, now + dt.timedelta(days=365)))
        country, site, level = rng.choice(countries), rng.choice(sites), rng.choice(ASSURANCE)
        spec = iss.HostSpec(f"{name}.scale.example", country=country,
                            locality=site, organization="Scale Demo", org_unit=region,
                            dns_names=(name,), policies=(level,))
        cert = iss.issue_host(spec, host_key, issuer, validity)
        revoke = i % 67 == 66 and issuer is not rogue
        if revoke:
            revoked[region].append((cert.serial_number, now - dt.timedelta(days=1)))
        host_facts.append(("" if issuer is rogue else region, country, site, level,
                           not (expired or revoke or issuer is rogue)))
        put(f"hosts/{name}.pem", iss.cert_pem(cert))
        host_names.append(name)
        host_entries.append({"name": name, "region": region, "cert_file": f"hosts/{name}.pem",
                             "tls_name": f"{name}.scale.example"})
    for issuer, _countries, _sites, region in regions:
        put(f"trust/{region}-ca.crl.pem", iss.crl_pem(iss.issue_crl(issuer, revoked[region],
                                                                      _crl_window(now))))

    say(f"{n_owners} owners, {n_rules} placement rules")
    owners_key = iss.make_key("ec")
    owners_ca = iss.Issuer(iss.issue_ca(iss.CASpec(iss.Subject("Scale Demo Owners CA",
                                                               organization="Scale Demo")),
                                        owners_key, iss.Validity(start, now + dt.timedelta(days=3650))),
                           owners_key)
    put("owners-trust/owners-ca.pem", iss.cert_pem(owners_ca.cert))
    put("owners-trust/owners-ca.crl.pem", iss.crl_pem(iss.issue_crl(owners_ca, [], _crl_window(now))))
    put("owners-trust/owners-ca.crl.pem", iss.crl_pem(iss.issue_crl(owners_ca, [], _crl_window(now))))
    owner_list: list[tuple[str, iss.Issuer]] = []
    for i in range(n_owners):
        key = iss.make_key("ec")
        email = f"owner{i:02d}@scale.example"
        cert = iss.issue_owner(iss.Subject(f"owner{i:02d}", organization="Scale Demo"), key, owners_ca,
                               iss.Validity(start, now + dt.timedelta(days=730)), email=email)
        owner_list.append((email, iss.Issuer(cert, key)))
    root_fp = (_cn(root), fingerprint(root.cert))
    region_fps = [(_cn(r[0]), fingerprint(r[0].cert)) for r in regions]
    shapes: list[tuple[list[tuple[str, str]], dict[str, list[str]], str]] = []
    for _ in range(n_rules):
        r = rng.randrange(len(REGIONS))
        # the rule's own region's CA (its countries are there), sometimes others or the root
        trust = [root_fp] if rng.random() < 0.2 else list(dict.fromkeys(
            [region_fps[r], *rng.sample(region_fps, rng.randint(0, 2))]))
        require: dict[str, list[str]] = {}
        if rng.random() < 0.8:
            countries = REGIONS[r][1]
            require["country"] = rng.sample(countries, rng.randint(1, len(countries)))
        if rng.random() < 0.2:
            require["locality"] = rng.sample(REGIONS[r][2], 1)
        if rng.random() < 0.5:
            require["policies"] = [rng.choice(ASSURANCE[1:])]
        shapes.append((trust, require, REGIONS[r][0]))

    region_of_fp = {fp: REGIONS[k][0] for k, (_cn_, fp) in enumerate(region_fps)}

    def admits(shape: tuple[list[tuple[str, str]], dict[str, list[str]], str], h: int) -> bool:
        trust, require, _region = shape
        ca, country, site, level, ok = host_facts[h]
        if not ok or not ca:
            return False
        if root_fp not in trust and ca not in {region_of_fp.get(fp) for _n, fp in trust}:
            return False
        return (country in require.get("country", [country]) and site in require.get("locality", [site])
                and all(p == level for p in require.get("policies", [])))

    admitted = [[h for h in range(n_hosts) if admits(shape, h)] for shape in shapes]
    say(f"{n_vms:,} VMs with owner-signed ES256 policies")
    vm_width = _name_width(n_vms)
    vm_entries: list[dict[str, Any]] = []
    nbf, exp = now - dt.timedelta(days=10), now + dt.timedelta(days=355)
    for i in range(n_vms):
        email, signer = owner_list[i % n_owners]
        shape = rng.randrange(n_rules)
        trust, require, region = shapes[shape]
        name = f"vm-{i:0{vm_width}d}"
        vm_uuid = str(uuidlib.UUID(int=rng.getrandbits(128), version=4))
        # most VMs run where their policy admits them (a few do not: something to explain)
        homes = admitted[shape]
        home = homes[rng.randrange(len(homes))] if homes and i % 50 != 7 else rng.randrange(n_hosts)
        entry: dict[str, Any] = {"uuid": vm_uuid, "name": name, "host": host_names[home],
                                 "memory_mib": rng.choice((1024, 2048, 4096, 8192)),
                                 "vcpus": rng.choice((1, 2, 4))}
        if i % 211 != 210:  # a few VMs without any policy
            payload = policy_mod.build_policy_payload(
                owner=email, vm_uuid=vm_uuid, vm_name=name, trusted_cas=trust, require=require,
                not_before=nbf, not_after=exp, labels=(region,))
            token = policy_mod.sign_policy(payload, signer.key, [signer.cert])
            put(f"policies/{name}.jws", token.encode() + b"\n")
            entry["policy_file"] = f"policies/{name}.jws"
        vm_entries.append(entry)
        if i and i % 2000 == 0:
            say(f"  {i:,} policies signed")

    say("admin and grants")
    admin_fp = "SHA256:" + "A" * 43
    grant_files = []
    for i, (email, signer) in enumerate(owner_list):
        payload = grants_mod.build_grant_payload(
            owner=email, admin=grants_mod.AdminRef("oncall", ssh_key=admin_fp), vms=[],
            label=REGIONS[i % len(REGIONS)][0], not_before=now - dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=30), emergency_only=False)
        put(f"grants/oncall-{i:02d}.jws", grants_mod.sign_grant(payload, signer.key, [signer.cert]).encode()
            + b"\n")
        grant_files.append(f"grants/oncall-{i:02d}.jws")

    doc: dict[str, Any] = {
        "name": f"scale-{n_vms}x{n_hosts}",
        "kind": "demo",
        "trust_dir": "trust",
        "owners_trust_dir": "owners-trust",
        "audit_log": "audit.log",
        "admins": [{"id": "oncall", "ssh_key_fingerprint": admin_fp}],
        "grants": ["grants"],
        "hosts": host_entries,
        "vms": vm_entries,
    }
    header = (f"# escort scale demo: {n_vms:,} VMs on {n_hosts:,} hosts, written by "
              f"`escort demo --vms {n_vms} --hosts {n_hosts}`.\n"
              "# Offline: hosts have no SSH address or libvirt URI; nothing is contacted.\n")
    if len(vm_entries) > VMS_PER_FILE:
        # a fleet file may be at most 2 MiB (adapters/fleetfile.py): bigger demos put their
        # VMs into vms/NNN.toml files, named by vm_files (paths there are relative to them)
        del doc["vms"]
        doc["vm_files"] = ["vms"]
        for k in range(0, len(vm_entries), VMS_PER_FILE):
            part = [{**e, "policy_file": f"../{e['policy_file']}"} if "policy_file" in e else e
                    for e in vm_entries[k:k + VMS_PER_FILE]]
            put(f"vms/{k // VMS_PER_FILE:03d}.toml", tomli_w.dumps({"vms": part}).encode())
    put("fleet.toml", (header + tomli_w.dumps(doc)).encode())
    put(STAMP, json.dumps({"version": VERSION, "vms": n_vms, "hosts": n_hosts, "generated": now.isoformat(),
                           "seed": seed}).encode())
    say(f"writing {len(files):,} files")
    made: set[Path] = set()
    for rel, data in files.items():  # a fresh temporary directory, renamed into place at the end
        target = work / rel
        if target.parent not in made:
            target.parent.mkdir(parents=True, exist_ok=True)
            made.add(target.parent)
        target.write_bytes(data)


def _crl_window(now: dt.datetime) -> iss.Validity:
    return iss.Validity(now - dt.timedelta(days=1), now + dt.timedelta(days=30))


def _cn(issuer: iss.Issuer) -> str:
    from cryptography.x509.oid import NameOID

    attrs = issuer.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else issuer.cert.subject.rfc4514_string()


def scale_dir(vms: int, hosts: int) -> Path:
    """Where ``escort demo --vms N --hosts M`` keeps its fleet (user data dir)."""
    from console.demo import demo_dir

    return demo_dir().with_name(f"scale-{vms}x{hosts}")


def ensure_scale(dest: Path, *, vms: int, hosts: int, regenerate: bool = False,
                 progress: Progress | None = None) -> tuple[Path, bool]:
    """The scale fleet in ``dest``, generated when absent, of another size, older than
    5 days (its dates must stay meaningful) or asked -> (fleet file, generated)."""
    try:
        stamp = json.loads((dest / STAMP).read_text())
        made = dt.datetime.fromisoformat(stamp["generated"])
        fresh = (stamp.get("version") == VERSION and stamp.get("vms") == vms and stamp.get("hosts") == hosts
                 and (dest / "fleet.toml").is_file()
                 and dt.datetime.now(dt.UTC) - made < dt.timedelta(days=5))
    except (OSError, ValueError, KeyError, TypeError):
        fresh = False
    if fresh and not regenerate:
        return dest / "fleet.toml", False
    try:
        return generate_scale(dest, vms=vms, hosts=hosts, progress=progress), True
    except OSError as exc:
        raise InputError(f"{dest}: cannot write the scale demo fleet ({exc.strerror or exc})") from exc


__all__ = ["ensure_scale", "generate_scale", "scale_dir"]
