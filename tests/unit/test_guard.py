"""The host guard: the same verdict as escort, fail closed, and a bundle Debian's python3 runs.

``guard_decide`` must agree with ``FleetService.explain`` for every (VM, host) pair
(one verdict everywhere); the bundle that `escort hosts guard install` pushes is
unpacked here and run by ``/usr/bin/python3 -I -S`` — the host's interpreter without
any site-packages — exactly as libvirt runs the hook.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from console.core.guard import GuardConfig, GuardMaterial, guard_decide, material_digest, vms_digest
from console.core.issuance import cert_pem
from console.core.policy import policy_metadata_xml
from console.services.fleet import FleetService
from console.services.guard import bundle, payload, plan_for
from tests.unit.trustkit import DB_UUID, T0, WEB_UUID, FleetFiles, build_fleet

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture()
def fleet(tmp_path: Path) -> FleetFiles:
    return build_fleet(tmp_path)


def domain_xml(name: str, uuid: str, token: str = "", extra: str = "") -> str:
    meta = f"<metadata>{policy_metadata_xml(token)}</metadata>" if token else ""
    return (f"<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>{meta}"
            f"<memory unit='MiB'>64</memory>{extra}</domain>")


def _plan(service: FleetService, host: str, **kw: object) -> tuple[GuardConfig, GuardMaterial]:
    assert service.spec is not None
    spec = next(h for h in service.spec.hosts if h.name == host)
    p = plan_for(service, spec, **kw)  # type: ignore[arg-type]
    return p.config, p.material


def test_guard_agrees_with_escort_for_every_pair(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    assert s.spec is not None
    seen = set()
    for h in s.spec.hosts:
        config, material = _plan(s, h.name)
        cert = (fleet.root / "certs" / f"{h.name}.pem").read_bytes()
        for vm in s.vms():
            xml = domain_xml(vm.name, vm.uuid, s.policy_token(vm.uuid))
            v = guard_decide(xml, cert, material, config, T0)
            d = s.explain(vm.uuid, h.name)
            codes = [r.code for r in d.reasons if r.severity == "error" and r.code != "host.current"]
            assert v.allowed == (not codes), (vm.name, h.name, v, codes)
            if codes:
                assert list(v.codes) == codes
                assert v.line().startswith(f"escort-guard refused {vm.name}: {codes[0]}: ")
                assert "\n" not in v.line()
            assert v.policy_digest == s.policy(vm.uuid).digest
            seen.add(v.allowed)
    assert seen == {True, False}


def test_stripped_and_missing_policies(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    config, material = _plan(s, "hv-fr-1")
    cert = (fleet.root / "certs" / "hv-fr-1.pem").read_bytes()
    assert config.policy_uuids == {WEB_UUID, DB_UUID}
    v = guard_decide(domain_xml("web-1", WEB_UUID), cert, material, config, T0)
    assert not v.allowed and v.code == "guard.policy_stripped"
    other = "11111111-2222-3333-4444-555555555555"
    v = guard_decide(domain_xml("plain", other), cert, material, config, T0)
    assert v.allowed and v.code == "guard.no_policy"
    strict = GuardConfig(config.host, "refuse", config.policy_uuids, {}, config.host_cert)
    v = guard_decide(domain_xml("plain", other), cert, material, strict, T0)
    assert not v.allowed and v.code == "guard.no_policy"


def test_fail_closed(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    config, material = _plan(s, "hv-fr-1")
    cert = (fleet.root / "certs" / "hv-fr-1.pem").read_bytes()
    web = domain_xml("web-1", WEB_UUID, s.policy_token(WEB_UUID))
    assert guard_decide(web, cert, material, config, T0).allowed
    # unreadable trust material refuses everything, policy or not
    broken = GuardMaterial([("000.pem", b"not a certificate")], (), material.owner_certs)
    for xml in (web, domain_xml("plain", "11111111-2222-3333-4444-555555555555")):
        v = guard_decide(xml, cert, broken, config, T0)
        assert not v.allowed and v.code == "guard.trust_unusable"
    # a policy that does not parse
    bad = web.replace(s.policy_token(WEB_UUID)[:20], "x" * 20)
    v = guard_decide(bad, cert, material, config, T0)
    assert not v.allowed and v.code.startswith("policy.")
    # XML that is not a domain, or carries entities
    for xml in ("", "<domain", "<!DOCTYPE x [<!ENTITY a 'b'>]><domain/>", "<network/>",
                "<domain><name>x</name><uuid>nope</uuid></domain>"):
        v = guard_decide(xml, cert, material, config, T0)
        assert not v.allowed and v.code == "guard.xml_unusable", xml
    # the host's own certificate unreadable, or expired
    v = guard_decide(web, b"garbage", material, config, T0)
    assert not v.allowed and v.code == "guard.host_cert_unreadable"
    late = T0 + dt.timedelta(days=800)
    v = guard_decide(web, cert, material, config, late)
    assert not v.allowed and "cert.expired" in v.codes


def test_digest_covers_material_and_vm_list(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    config, material = _plan(s, "hv-fr-1")
    d = material_digest(material, config)
    assert d == material_digest(material, config)
    fewer = replace(config, policy_uuids=frozenset({WEB_UUID}))
    assert material_digest(material, fewer) == d  # the VM list has its own digest
    assert vms_digest(fewer.policy_uuids) != vms_digest(config.policy_uuids)
    refuse = replace(config, no_policy="refuse")
    assert material_digest(material, refuse) != d
    more = GuardMaterial([*material.host_certs, ("x.pem", cert_pem(fleet.kit.us.cert))],
                         material.host_crls, material.owner_certs, material.owner_crls)
    assert material_digest(more, config) != d


def _unpack(data: bytes, root: Path) -> None:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar.getmembers():
            if m.name.startswith("lib/"):
                dest = root / "lib" / m.name[4:]
            elif m.name.startswith("conf/"):
                dest = root / "conf" / m.name[5:]
            else:
                dest = root / m.name
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            f = tar.extractfile(m)
            assert f is not None
            dest.write_bytes(f.read())


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="needs Debian's /usr/bin/python3")
def test_bundle_runs_on_the_system_python_alone(fleet: FleetFiles, tmp_path: Path) -> None:
    """The pushed bundle, run by python3 -I -S (no site-packages at all), as libvirt runs it."""
    s = FleetService.load(fleet.fleet, at=T0)
    assert s.spec is not None
    spec = next(h for h in s.spec.hosts if h.name == "hv-us-1")
    host_cert = fleet.root / "certs" / "hv-us-1.pem"
    spec = type(spec)(**{**spec.__dict__, "remote_cert": str(host_cert)})
    plan = plan_for(s, spec)
    root = tmp_path / "host"
    _unpack(payload(plan, with_code=True), root)
    assert "cryptography/__init__.py" in bundle().files
    log = root / "guard.log"
    env = {"ESCORT_GUARD_CONF": str(root / "conf"), "ESCORT_GUARD_LOG": str(log),
           "ESCORT_GUARD_SEEN": str(root / "state" / "seen.json"), "ESCORT_GUARD_AT": T0.isoformat(),
           "PATH": "/usr/bin:/bin"}
    runner = (f"import sys; sys.path.insert(0, {str(root / 'lib')!r}); "
              "from console.guard.hook import main; sys.exit(main(sys.argv))")

    def hook(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([SYSTEM_PYTHON, "-I", "-S", "-c", runner, *args], input=stdin, env=env,
                              capture_output=True, text=True, timeout=120, check=False)

    web = domain_xml("web-1", WEB_UUID, s.policy_token(WEB_UUID))
    refused = hook("web-1", "migrate", "begin", "-", stdin=web)
    assert refused.returncode == 1 and refused.stdout == ""
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("escort-guard refused web-1: ca.not_trusted: ")
    db = domain_xml("db-1", DB_UUID, s.policy_token(DB_UUID))
    admitted = hook("db-1", "migrate", "begin", "-", stdin=db)
    assert admitted.returncode == 0, admitted.stderr
    assert admitted.stdout == ""  # libvirt would take stdout as a replacement XML
    assert hook("db-1", "started", "begin", "-").returncode == 0  # other operations pass
    entries = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(e["vm"], e["verdict"], e["reason"]) for e in entries] == [
        ("web-1", "refused", "ca.not_trusted"), ("db-1", "admitted", "guard.admitted")]
    assert entries[0]["uuid"] == WEB_UUID and entries[0]["policy_digest"] == s.policy(WEB_UUID).digest
    assert entries[0]["source"] == "incoming migration"
    st = json.loads(hook("--status").stdout)
    assert st["ok"] and st["trust_digest"] == plan.digest and st["version"] == plan.config.version
    assert st["python"].startswith("3.")
    # fail closed: trust material gone
    shutil.rmtree(root / "conf" / "trust")
    gone = hook("db-1", "migrate", "begin", "-", stdin=db)
    assert gone.returncode == 1 and "guard.trust_unusable" in gone.stderr
    assert len(gone.stderr.strip().splitlines()) == 1
    st = json.loads(hook("--status").stdout)
    assert not st["ok"]


def test_guard_honours_the_fleets_missing_crl_setting(fleet: FleetFiles) -> None:
    """Revocation fails closed on the host too, and missing_crl = "warn" reaches the guard."""
    for crl in (fleet.root / "trust" / "hosts").glob("*.crl"):
        crl.unlink()  # the host CAs publish no CRL at all
    s = FleetService.load(fleet.fleet, at=T0)
    config, material = _plan(s, "hv-fr-1")
    cert = (fleet.root / "certs" / "hv-fr-1.pem").read_bytes()
    web = domain_xml("web-1", WEB_UUID, s.policy_token(WEB_UUID))
    v = guard_decide(web, cert, material, config, T0)
    assert not v.allowed and "revocation.missing" in v.codes
    assert not s.explain(WEB_UUID, "hv-fr-1").allowed  # the same verdict as escort's
    toml = fleet.fleet.read_text()
    fleet.fleet.write_text(toml.replace('grants = ["grants"]', 'grants = ["grants"]\nmissing_crl = "warn"',
                                        1))
    s = FleetService.load(fleet.fleet, at=T0)
    config, material = _plan(s, "hv-fr-1")
    assert config.missing_crl == "warn"
    parsed, _ = GuardConfig.parse(json.dumps(config.as_json()).encode())
    assert parsed.missing_crl == "warn"
    assert guard_decide(web, cert, material, parsed, T0).allowed
    assert s.explain(WEB_UUID, "hv-fr-1").allowed
