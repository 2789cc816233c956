"""escort explain/targets/policy/grant against a small fleet built in a tmp dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from console.adapters.fleetfile import load_fleet
from console.cli import main
from tests.unit.trustkit import ANNE_KEY, DB_UUID, T0, WEB_UUID, FleetFiles, build_fleet, fp

AT = T0.isoformat()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetFiles:
    return build_fleet(tmp_path_factory.mktemp("fleet"))


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_explain_allowed_json(fleet: FleetFiles) -> None:
    r = run("explain", "--fleet", str(fleet.fleet), "--at", AT, "--json", "web-1", "hv-fr-1")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) == {"vm", "host", "admin", "at", "allowed", "reasons", "steps"}
    assert out["allowed"] is True and out["vm"] == "web-1" and out["host"] == "hv-fr-1"
    assert out["admin"] is None and out["reasons"] == []
    assert next(s["title"] for s in out["steps"]) == "Owner's policy"


def test_explain_refused_lists_every_reason(fleet: FleetFiles) -> None:
    r = run("explain", "--fleet", str(fleet.fleet), "--at", AT, "--json", WEB_UUID, "hv-us-1")
    assert r.exit_code == 1
    codes = {x["code"] for x in json.loads(r.stdout)["reasons"]}
    assert codes == {"ca.not_trusted", "attr.country"}
    assert all(x["fix"] for x in json.loads(r.stdout)["reasons"])
    text = run("explain", "--fleet", str(fleet.fleet), "--at", AT, "web-1", "hv-de-old")
    assert text.exit_code == 1
    assert "REFUSED" in text.stdout and "cert.expired" in text.stdout and "[FAIL]" in text.stdout
    assert "hv-de-old" in text.stdout and "Hv-" not in text.stdout  # names are never re-cased


def test_explain_with_admin_grant(fleet: FleetFiles) -> None:
    base = ["explain", "--fleet", str(fleet.fleet), "--at", AT, "--json"]
    assert run(*base, "--admin", "anne", "web-1", "hv-fr-1").exit_code == 0
    bert = run(*base, "--admin", "bert", "web-1", "hv-fr-1")
    assert bert.exit_code == 1
    assert [x["code"] for x in json.loads(bert.stdout)["reasons"]] == ["grant.missing"]
    db = run(*base, "--admin", "anne", "db-1", "hv-de-1")
    assert [x["code"] for x in json.loads(db.stdout)["reasons"]] == ["grant.wrong_vm"]
    ghost = run(*base, "--admin", "ghost", "web-1", "hv-fr-1")
    assert "grant.unknown_admin" in {x["code"] for x in json.loads(ghost.stdout)["reasons"]}


def test_explain_later_policy_expired(fleet: FleetFiles) -> None:
    r = run("explain", "--fleet", str(fleet.fleet), "--at", "2027-06-01T00:00:00Z", "--json",
            "web-1", "hv-fr-1")
    assert r.exit_code == 1
    assert "policy.expired" in {x["code"] for x in json.loads(r.stdout)["reasons"]}


@pytest.mark.parametrize(("args", "needle"), [
    (["nosuchvm", "hv-fr-1"], "no VM 'nosuchvm'"),
    (["web-1", "nosuchhost"], "no host 'nosuchhost'"),
    (["web-1", "hv-fr-1", "--at", "yesterday"], "not an RFC 3339 time"),
])
def test_explain_bad_input_exit_2(fleet: FleetFiles, args: list[str], needle: str) -> None:
    r = run("explain", "--fleet", str(fleet.fleet), *args)
    assert r.exit_code == 2
    assert needle in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_missing_or_broken_fleet_exit_2(tmp_path: Path) -> None:
    r = run("explain", "--fleet", str(tmp_path / "nope.toml"), "a", "b")
    assert r.exit_code == 2 and "no such fleet file" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nkind = "lab"\ntrust_dir = "t"\nowners_trust_dir = "o"\n')
    r = run("targets", "--fleet", str(bad), "a")
    assert r.exit_code == 2 and "trust directory" in r.stderr and r.stderr.count("\n") == 1


def test_group_level_fleet_option(fleet: FleetFiles) -> None:
    r = run("--fleet", str(fleet.fleet), "explain", "--at", AT, "web-1", "hv-fr-1")
    assert r.exit_code == 0, r.output


def test_targets_json(fleet: FleetFiles) -> None:
    r = run("targets", "--fleet", str(fleet.fleet), "--at", AT, "--json", "db-1")
    assert r.exit_code == 0
    out = json.loads(r.stdout)
    assert out["vm"] == "db-1" and out["allowed"] == ["hv-de-1"]
    refused = {x["host"]: {c["code"] for c in x["reasons"]} for x in out["refused"]}
    assert refused == {"hv-de-old": {"cert.expired"}, "hv-fr-1": {"attr.country"},
                       "hv-us-1": {"host.current"}}


def test_policy_sign_show_and_xml(fleet: FleetFiles, tmp_path: Path) -> None:
    out = tmp_path / "p.jws"
    eu_pem = fleet.root / "trust" / "hosts" / "eu.pem"
    r = run("policy", "sign", "--key", str(fleet.alice_key), "--cert", str(fleet.alice_cert),
            "--vm-uuid", WEB_UUID, "--vm-name", "web-1", "--trust-ca", str(eu_pem),
            "--trust-ca", f"Root={fp(fleet.kit.root.cert)}", "--require", "country=de,fr",
            "--require", "policy=assurance:high", "--days", "30", "--start", AT, "--out", str(out))
    assert r.exit_code == 0, r.output
    owners = str(fleet.root / "trust" / "owners")
    show = run("policy", "show", "--owners", owners, "--at", AT, "--json", str(out))
    assert show.exit_code == 0, show.output
    data = json.loads(show.stdout)
    assert data["valid"] and data["payload"]["require"]["country"] == ["DE", "FR"]
    assert data["owner"]["email"] == "alice@example.org" and len(data["digest"]) == 64
    assert {c["sha256"] for c in data["payload"]["trusted_cas"]} == {fp(fleet.kit.eu.cert),
                                                                      fp(fleet.kit.root.cert)}
    # the signed policy works end-to-end when attached to the VM in the fleet file
    wrong = run("policy", "show", "--owners", owners, "--at", AT, "--vm-uuid", DB_UUID, str(out))
    assert wrong.exit_code == 1 and "policy.vm_mismatch" in wrong.stdout
    assert run("policy", "show", "--at", AT, str(out)).exit_code == 1  # no owners' store: untrusted
    xml = run("policy", "xml", str(out))
    assert xml.exit_code == 0 and "https://escort.dev/xmlns/policy/1" in xml.stdout
    domain = tmp_path / "dom.xml"
    domain.write_text(f"<domain><name>web-1</name><metadata>{xml.stdout.strip()}</metadata></domain>")
    assert run("policy", "show", "--owners", owners, "--at", AT, str(domain)).exit_code == 0
    # overwriting needs --force
    again = run("policy", "sign", "--key", str(fleet.alice_key), "--cert", str(fleet.alice_cert),
                "--vm-uuid", WEB_UUID, "--trust-ca", str(eu_pem), "--out", str(out))
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_policy_show_tampered(fleet: FleetFiles, tmp_path: Path) -> None:
    h, p, s = (fleet.root / "policies" / "web-1.jws").read_text().strip().split(".")
    bad = tmp_path / "bad.jws"
    bad.write_text(f"{h}.{p}.{s[:-6]}AAAAAA")
    r = run("policy", "show", "--owners", str(fleet.root / "trust" / "owners"), "--at", AT, str(bad))
    assert r.exit_code == 1 and "policy.signature" in r.stdout
    junk = tmp_path / "junk.jws"
    junk.write_text("hello")
    assert run("policy", "show", str(junk)).exit_code == 2


@pytest.mark.parametrize(("extra", "needle"), [
    (["--trust-ca", "nonsense"], "--trust-ca 'nonsense'"),
    (["--trust-ca", "X=abc"], "not a SHA-256 fingerprint"),
    (["--trust-ca", "X=" + "ab" * 32, "--require", "planet=mars"], "--require 'planet=mars'"),
])
def test_policy_sign_bad_input(fleet: FleetFiles, tmp_path: Path, extra: list[str], needle: str) -> None:
    r = run("policy", "sign", "--key", str(fleet.alice_key), "--cert", str(fleet.alice_cert),
            "--vm-uuid", WEB_UUID, *extra, "--out", str(tmp_path / "x.jws"))
    assert r.exit_code == 2 and needle in r.stderr, r.stderr
    assert not (tmp_path / "x.jws").exists()


def test_policy_sign_key_cert_mismatch(fleet: FleetFiles, tmp_path: Path) -> None:
    other = tmp_path / "other-key.pem"
    from console.core.issuance import key_pem, make_key
    other.write_bytes(key_pem(make_key("ec")))
    r = run("policy", "sign", "--key", str(other), "--cert", str(fleet.alice_cert), "--vm-uuid", WEB_UUID,
            "--trust-ca", "X=" + "ab" * 32, "--out", str(tmp_path / "x.jws"))
    assert r.exit_code == 2 and "does not belong" in r.stderr


def test_grant_issue_and_show(fleet: FleetFiles, tmp_path: Path) -> None:
    out = tmp_path / "g.jws"
    r = run("grant", "issue", "--key", str(fleet.alice_key), "--cert", str(fleet.alice_cert),
            "--admin", "bert", "--admin-key-fp", "SHA256:" + "b" * 43, "--vm", DB_UUID,
            "--emergency-only", "--hours", "4", "--start", AT, "--out", str(out))
    assert r.exit_code == 0, r.output
    show = run("grant", "show", "--owners", str(fleet.root / "trust" / "owners"), "--at", AT, "--json",
               str(out))
    assert show.exit_code == 0, show.output
    payload = json.loads(show.stdout)["payload"]
    assert payload["admin"] == {"id": "bert", "ssh_key": "SHA256:" + "b" * 43}
    assert payload["vms"] == [DB_UUID] and payload["emergency_only"] is True
    late = run("grant", "show", "--owners", str(fleet.root / "trust" / "owners"),
               "--at", "2026-06-01T20:00:00Z", str(out))
    assert late.exit_code == 1 and "grant.expired" in late.stdout
    none = run("grant", "issue", "--key", str(fleet.alice_key), "--cert", str(fleet.alice_cert),
               "--admin", "bert", "--vm", DB_UUID, "--out", str(tmp_path / "n.jws"))
    assert none.exit_code == 2 and "bind the admin to their SSH key" in none.stderr
    assert ANNE_KEY  # the fixture's admin key is what the fleet file names


def test_owner_certificate_made_with_openssl(fleet: FleetFiles, tmp_path: Path) -> None:
    """Organisations bring their own owners' CA: openssl-made CA and owner cert must sign policies."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:  # pragma: no cover - openssl is a dev dependency (deps/)
        pytest.fail("openssl CLI missing")

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "owner.ext").write_text("basicConstraints=critical,CA:FALSE\n"
                                        "keyUsage=critical,digitalSignature\n"
                                        "extendedKeyUsage=emailProtection\n"
                                        "subjectAltName=email:olga@corp.example\n"
                                        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
         "ca.key", "-out", "ca.pem", "-subj", "/O=Corp/CN=Corp Owners CA", "-days", "3650",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    ossl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "olga.key", "-out", "olga.csr",
         "-subj", "/O=Corp/CN=Olga")
    ossl("x509", "-req", "-in", "olga.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
         "-out", "olga.pem", "-days", "700", "-extfile", "owner.ext")
    # ... and its CRL (revocation fails closed without one), from `openssl ca -gencrl`.
    (tmp_path / "index.txt").write_text("")
    (tmp_path / "crlnumber").write_text("01\n")
    (tmp_path / "ca.cnf").write_text("[ca]\ndefault_ca=d\n[d]\ndatabase=index.txt\ncertificate=ca.pem\n"
                                     "private_key=ca.key\ncrlnumber=crlnumber\ndefault_md=sha256\n"
                                     "default_crl_days=30\n")
    ossl("ca", "-config", "ca.cnf", "-gencrl", "-out", "ca.crl")
    owners = tmp_path / "owners"
    owners.mkdir()
    shutil.copy(tmp_path / "ca.pem", owners / "ca.pem")
    shutil.copy(tmp_path / "ca.crl", owners / "ca.crl")
    out = tmp_path / "p.jws"
    r = run("policy", "sign", "--key", str(tmp_path / "olga.key"), "--cert", str(tmp_path / "olga.pem"),
            "--vm-uuid", WEB_UUID, "--trust-ca", f"EU={fp(fleet.kit.eu.cert)}", "--out", str(out))
    assert r.exit_code == 0, r.output
    # (openssl 3.0 cannot backdate certificates, so this test runs at the real time)
    show = run("policy", "show", "--owners", str(owners), "--json", str(out))
    assert show.exit_code == 0, show.output
    data = json.loads(show.stdout)
    assert data["owner"]["email"] == "olga@corp.example" and data["header"]["alg"] == "RS256"
    # the fleet's own owners' CA does not know Olga
    other = run("policy", "show", "--owners", str(fleet.root / "trust" / "owners"), str(out))
    assert other.exit_code == 1 and "policy.owner_untrusted" in other.stdout


def test_policy_sign_with_intermediate_in_x5c(fleet: FleetFiles, tmp_path: Path) -> None:
    """The owners' trust dir holds only the root; --chain puts the intermediate into x5c."""
    import datetime as dt

    from console.core import issuance as iss

    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    root_key = iss.make_key("ec")
    root = iss.Issuer(iss.issue_ca(iss.CASpec(iss.Subject("Owners Root")), root_key,
                                   iss.Validity.days(3650, start=start)), root_key)
    mid_key = iss.make_key("ec")
    mid = iss.Issuer(iss.issue_ca(iss.CASpec(iss.Subject("Owners Dept"), path_len=0), mid_key,
                                  iss.Validity.days(1825, start=start), issuer=root), mid_key)
    key = iss.make_key("ed25519")
    cert = iss.issue_owner(iss.Subject("Dora"), key, mid, iss.Validity.days(365, start=start),
                           email="dora@example.org")
    (tmp_path / "owners").mkdir()
    (tmp_path / "owners" / "root.pem").write_bytes(iss.cert_pem(root.cert))
    # Both CAs publish CRLs into the owners' trust dir (the x5c intermediate's too).
    for name, ca in (("root", root), ("mid", mid)):
        (tmp_path / "owners" / f"{name}.crl").write_bytes(iss.crl_pem(iss.issue_crl(
            ca, [], iss.Validity.days(3650, start=start))))
    (tmp_path / "mid.pem").write_bytes(iss.cert_pem(mid.cert))
    (tmp_path / "dora.pem").write_bytes(iss.cert_pem(cert))
    (tmp_path / "dora.key").write_bytes(iss.key_pem(key))
    base = ["policy", "sign", "--key", str(tmp_path / "dora.key"), "--cert", str(tmp_path / "dora.pem"),
            "--vm-uuid", WEB_UUID, "--trust-ca", f"EU={fp(fleet.kit.eu.cert)}", "--start", AT]
    with_chain = run(*base, "--chain", str(tmp_path / "mid.pem"), "--out", str(tmp_path / "with.jws"))
    assert with_chain.exit_code == 0
    assert run(*base, "--out", str(tmp_path / "without.jws")).exit_code == 0
    owners = str(tmp_path / "owners")
    ok = run("policy", "show", "--owners", owners, "--at", AT, "--json", str(tmp_path / "with.jws"))
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["header"]["alg"] == "EdDSA"
    missing = run("policy", "show", "--owners", owners, "--at", AT, str(tmp_path / "without.jws"))
    assert missing.exit_code == 1 and "policy.owner_untrusted" in missing.stdout


def test_one_pair_reads_only_that_pair(fleet: FleetFiles, tmp_path: Path) -> None:
    """explain reads the VM's policy file and the host's certificate, nothing else: other
    VMs' policies and other hosts' certificates may be missing (they are not opened)."""
    copy = tmp_path / "copy"
    shutil.copytree(fleet.fleet.parent, copy)
    fleet_file = copy / fleet.fleet.name
    spec = load_fleet(fleet_file)
    web = next(v for v in spec.vms if v.name == "web-1")
    for v in spec.vms:
        if v.name != "web-1" and v.policy_file and v.policy_file != web.policy_file:
            Path(v.policy_file).unlink(missing_ok=True)
    for h in spec.hosts:
        if h.name != "hv-fr-1" and h.cert_file:
            Path(h.cert_file).unlink(missing_ok=True)
    ok = run("explain", "--offline", "--fleet", str(fleet_file), "--at", AT, "--json", "web-1", "hv-fr-1")
    assert ok.exit_code == 0, ok.output
    # asking about a host whose certificate file is gone is unusable input (exit 2, one line)
    other = next(h.name for h in spec.hosts if h.name != "hv-fr-1" and h.cert_file)
    bad = CliRunner().invoke(main, ["explain", "--offline", "--fleet", str(fleet_file), "--at", AT,
                                    "web-1", other])
    assert bad.exit_code == 2 and "no such certificate" in bad.stderr and bad.stderr.count("\n") == 1
