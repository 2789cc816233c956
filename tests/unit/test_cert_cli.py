"""``escort cert verify`` (the stable contract) and ``escort pki init|issue-host|issue-owner``."""

from __future__ import annotations

import datetime as dt
import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from console.adapters import files
from console.cli import main
from console.core import issuance as iss
from console.core import pki

from .conftest import DEMO_START, DemoPKI

AT = "2026-01-31T00:00:00Z"  # DEMO_AT, as RFC 3339


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def trust(tmp_path: Path, demo_pki: DemoPKI) -> Path:
    return demo_pki.write_trust_dir(tmp_path / "trust")


def write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


class TestCertVerify:
    def test_valid_exit_0_and_json_shape(self, tmp_path: Path, trust: Path, demo_pki: DemoPKI) -> None:
        cert = write(tmp_path / "h.pem", iss.cert_pem(demo_pki.host()[0]))
        r = run("cert", "verify", "--trust", str(trust), "--at", AT, cert)
        assert r.exit_code == 0, r.output
        assert r.stdout.splitlines()[0] == "valid: h1.example"
        r = run("cert", "verify", "--trust", str(trust), "--at", AT, "--json", cert)
        assert r.exit_code == 0
        data = json.loads(r.stdout)
        assert data["valid"] is True and data["reasons"] == [] and data["warnings"] == []
        assert data["chain"] == [
            "CN=h1.example,O=Escort Demo,L=Frankfurt,C=DE",
            "CN=Escort eu-central CA,OU=eu-central,O=Escort Demo,ST=Hessen,C=DE",
            "CN=Escort Demo Root CA,O=Escort Demo",
        ]

    def test_invalid_exit_1_every_reason_with_fix(self, tmp_path: Path, trust: Path,
                                                  demo_pki: DemoPKI) -> None:
        host, _ = demo_pki.host(days=10)
        (trust / "eu.crl").write_bytes(demo_pki.crl(demo_pki.regions["eu-central"], [host.serial_number]))
        cert = write(tmp_path / "h.pem", iss.cert_pem(host))
        r = run("cert", "verify", "--trust", str(trust), "--at", AT, cert)
        assert r.exit_code == 1
        lines = r.stdout.splitlines()
        assert lines[0] == "INVALID: h1.example"
        reason_lines = [ln for ln in lines if ln.startswith("  cert.")]
        assert [ln.split(":")[0].strip() for ln in reason_lines] == ["cert.expired", "cert.revoked"]
        assert all(" Fix: " in ln for ln in reason_lines)
        r = run("cert", "verify", "--trust", str(trust), "--at", AT, "--json", cert)
        data = json.loads(r.stdout)
        assert r.exit_code == 1 and data["valid"] is False
        assert [x["code"] for x in data["reasons"]] == ["cert.expired", "cert.revoked"]
        assert all(set(x) >= {"code", "message", "fix"} for x in data["reasons"])

    def test_at_changes_the_verdict(self, tmp_path: Path, trust: Path, demo_pki: DemoPKI) -> None:
        cert = write(tmp_path / "h.pem", iss.cert_pem(demo_pki.host(days=10)[0]))
        assert run("cert", "verify", "--trust", str(trust), "--at", "2026-01-05T00:00:00+02:00", cert
                   ).exit_code == 0
        assert run("cert", "verify", "--trust", str(trust), "--at", "2026-02-01", cert).exit_code == 1

    def test_stale_crl_refuses_and_trust_problems_are_shown(self, tmp_path: Path, trust: Path,
                                                            demo_pki: DemoPKI) -> None:
        for old in trust.glob("*eu-central*.crl.pem"):
            old.unlink()
        (trust / "eu.crl").write_bytes(demo_pki.crl(demo_pki.regions["eu-central"], days=7))
        (trust / "stray.key").write_bytes(iss.key_pem(demo_pki.root.key))
        cert = write(tmp_path / "h.pem", iss.cert_pem(demo_pki.host()[0]))
        r = run("cert", "verify", "--trust", str(trust), "--at", AT, cert)
        assert r.exit_code == 1  # revocation status unknown: refused (fail closed)
        assert "revocation.stale:" in r.stdout and "Fix: Fetch a current CRL" in r.stdout
        assert "contains a private key" in r.stderr
        data = json.loads(run("cert", "verify", "--trust", str(trust), "--at", AT, "--json", cert).stdout)
        assert [x["code"] for x in data["reasons"]] == ["revocation.stale"]
        assert {p["code"] for p in data["problems"]} == {"crl.stale", "file.private_key"}

    def test_full_chain_file(self, tmp_path: Path, demo_pki: DemoPKI) -> None:
        """Leaf + intermediate in CERT, only the root in the trust dir."""
        trust = tmp_path / "roots"
        trust.mkdir()
        (trust / "root.pem").write_bytes(iss.cert_pem(demo_pki.root.cert))
        crls = demo_pki.default_crls()
        (trust / "root.crl").write_bytes(crls[demo_pki.root.cert.subject][1])
        chain = iss.cert_pem(demo_pki.host()[0]) + iss.cert_pem(demo_pki.regions["eu-central"].cert)
        cert = write(tmp_path / "full.pem", chain)
        # The intermediate from the chain file publishes no CRL here: its hosts' revocation
        # status is unknown (refused), unless --missing-crl warn.
        r = run("cert", "verify", "--trust", str(trust), "--at", AT, "--json", cert)
        assert r.exit_code == 1
        assert [x["code"] for x in json.loads(r.stdout)["reasons"]] == ["revocation.missing"]
        r = run("cert", "verify", "--trust", str(trust), "--at", AT, "--missing-crl", "warn", "--json", cert)
        assert r.exit_code == 0 and [w["code"] for w in json.loads(r.stdout)["warnings"]] == [
            "revocation.missing"]
        # Its CRL, put in the trust directory, is used for the chain file's CA too.
        (trust / "eu.crl").write_bytes(crls[demo_pki.regions["eu-central"].cert.subject][1])
        r = run("cert", "verify", "--trust", str(trust), "--at", AT, "--json", cert)
        assert r.exit_code == 0, r.output
        assert len(json.loads(r.stdout)["chain"]) == 3

    @pytest.mark.parametrize(("make", "needle"), [
        (lambda d, p: write(d / "bad.pem", b"-----BEGIN CERTIFICATE-----\nxx!\n-----END CERTIFICATE-----\n"),
         "malformed PEM"),
        (lambda d, p: write(d / "c.pem", p.crl(p.root)), "is a CRL, expected a certificate"),
        (lambda d, p: write(d / "k.pem", iss.key_pem(p.root.key)), "contains a private key"),
        (lambda d, p: write(d / "big.pem", b"0" * (1024 * 1024 + 1)), "larger than 1024 KiB"),
        (lambda d, p: str(d / "missing.pem"), "no such certificate"),
    ])
    def test_unusable_certificate_exit_2(self, tmp_path: Path, trust: Path, demo_pki: DemoPKI,
                                         make: object, needle: str) -> None:
        cert = make(tmp_path, demo_pki)  # type: ignore[operator]
        r = run("cert", "verify", "--trust", str(trust), cert)
        assert r.exit_code == 2
        assert r.stdout == ""
        assert r.stderr.startswith("escort: ") and needle in r.stderr
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr

    def test_unusable_trust_dir_or_time_exit_2(self, tmp_path: Path, demo_pki: DemoPKI) -> None:
        cert = write(tmp_path / "h.pem", iss.cert_pem(demo_pki.host()[0]))
        empty = tmp_path / "empty"
        empty.mkdir()
        r = run("cert", "verify", "--trust", str(empty), cert)
        assert r.exit_code == 2 and r.stderr == f"escort: no CA certificates in {empty}\n"
        r = run("cert", "verify", "--trust", str(tmp_path / "nope"), cert)
        assert r.exit_code == 2 and "no such trust directory" in r.stderr
        trust = demo_pki.write_trust_dir(tmp_path / "trust")
        r = run("cert", "verify", "--trust", str(trust), "--at", "yesterday", cert)
        assert r.exit_code == 2 and "not an RFC 3339 time" in r.stderr


class TestPkiCommands:
    def test_init_layout_modes_and_refusal(self, tmp_path: Path) -> None:
        d = tmp_path / "ca"
        r = run("pki", "init", str(d))
        assert r.exit_code == 0, r.output
        assert sorted(p.name for p in (d / "trust").iterdir()) == [
            "eu-central-ca.crl", "eu-central-ca.pem", "eu-west-ca.crl", "eu-west-ca.pem",
            "root-ca.crl", "root-ca.pem", "us-east-ca.crl", "us-east-ca.pem"]
        assert sorted(p.name for p in (d / "owners").iterdir()) == ["owners-ca.crl", "owners-ca.pem"]
        keys = sorted((d / "private").iterdir())
        assert len(keys) == 5 and all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
        assert stat.S_IMODE((d / "private").stat().st_mode) == 0o700
        before = (d / "trust" / "root-ca.pem").read_bytes()
        r = run("pki", "init", str(d))
        assert r.exit_code == 2 and "already exists; use --force" in r.stderr
        assert (d / "trust" / "root-ca.pem").read_bytes() == before
        assert run("pki", "init", str(d), "--force").exit_code == 0
        assert (d / "trust" / "root-ca.pem").read_bytes() != before
        now = dt.datetime.now(dt.UTC)
        store, problems = files.load_trust_store(d / "trust", now)
        assert problems == [] and len(store.anchors) == 1 and len(store.anchors[0].children) == 3
        countries = {pki.host_attributes(n.info.cert).country for n in store.anchors[0].children}
        assert countries == {"DE", "FR", "US"}

    @pytest.mark.parametrize("key_type", ["rsa", "ed25519"])
    def test_issue_host_and_owner_verify(self, tmp_path: Path, key_type: str) -> None:
        d = tmp_path / "ca"
        assert run("pki", "init", str(d), "--key-type", key_type).exit_code == 0
        r = run("pki", "issue-host", "--ca-dir", str(d), "--ca", "eu-west", "--hostname", "h9.example",
                "--site", "Paris", "--assurance", "high", "--ip", "10.0.0.9", "--dns", "alt.example",
                "--key-type", key_type, "--out", str(tmp_path / "h9"))
        assert r.exit_code == 0, r.output
        cert_path, key_path = tmp_path / "h9-cert.pem", tmp_path / "h9-key.pem"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        cert = pki.load_certificate(cert_path.read_bytes(), "h9")
        attrs = pki.host_attributes(cert)
        assert (attrs.country, attrs.locality) == ("FR", "Paris")
        assert attrs.dns_names == ("h9.example", "alt.example") and attrs.ips == ("10.0.0.9",)
        assert attrs.policies == frozenset({"assurance:high"})
        iss.load_private_key(key_path.read_bytes(), "key")
        v = run("cert", "verify", "--trust", str(d / "trust"), "--json", str(cert_path))
        assert v.exit_code == 0, v.output
        assert json.loads(v.stdout)["chain"][1].startswith("CN=Escort eu-west CA")

        r = run("pki", "issue-owner", "--ca-dir", str(d), "--name", "Alice Example",
                "--email", "alice@example.org", "--out", str(tmp_path / "alice"))
        assert r.exit_code == 0, r.output
        owner = pki.load_certificate((tmp_path / "alice-cert.pem").read_bytes(), "alice")
        owners, _ = files.load_trust_store(d / "owners", dt.datetime.now(dt.UTC))
        assert owners.verify_owner(owner, [], dt.datetime.now(dt.UTC)).valid
        hosts, _ = files.load_trust_store(d / "trust", dt.datetime.now(dt.UTC))
        assert not hosts.verify_owner(owner, [], dt.datetime.now(dt.UTC)).valid
        assert not owners.verify_owner(cert, [], dt.datetime.now(dt.UTC)).valid  # hosts can't sign policies

    @pytest.mark.parametrize(("extra", "needle"), [
        (["--ca", "mars"], "no such CA certificate (available: eu-central, eu-west, root, us-east)"),
        (["--ca", "eu-west", "--ip", "10.0.0.999"], "not an IP address"),
        (["--ca", "eu-west", "--country", "France"], "two-letter"),
        (["--ca", "eu-west", "--policy", "no such policy"], "unknown certificate policy"),
        (["--ca", "eu-west", "--dns", "bad name"], "not a valid DNS name"),
    ])
    def test_issue_host_bad_input(self, tmp_path: Path, extra: list[str], needle: str) -> None:
        d = tmp_path / "ca"
        assert run("pki", "init", str(d)).exit_code == 0
        r = run("pki", "issue-host", "--ca-dir", str(d), "--hostname", "h.example",
                "--out", str(tmp_path / "h"), *extra)
        assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1
        assert not (tmp_path / "h-cert.pem").exists() and not (tmp_path / "h-key.pem").exists()

    def test_issue_refuses_overwrite_and_mismatched_key(self, tmp_path: Path) -> None:
        d = tmp_path / "ca"
        assert run("pki", "init", str(d)).exit_code == 0
        args = ["pki", "issue-owner", "--ca-dir", str(d), "--name", "Bob", "--out", str(tmp_path / "bob")]
        assert run(*args).exit_code == 0
        r = run(*args)
        assert r.exit_code == 2 and "already exists" in r.stderr
        assert run(*args, "--force").exit_code == 0
        (d / "private" / "eu-west-ca.key").write_bytes((d / "private" / "root-ca.key").read_bytes())
        r = run("pki", "issue-host", "--ca-dir", str(d), "--ca", "eu-west", "--hostname", "h.example",
                "--out", str(tmp_path / "h"))
        assert r.exit_code == 2 and "does not belong to" in r.stderr


def test_demo_start_is_what_at_means() -> None:
    """Guard for the AT constant above: it must stay inside the fixtures' validity."""
    assert pki.utc(dt.datetime.fromisoformat(AT)) == DEMO_START + dt.timedelta(days=30)


def test_pki_crl_revokes_and_renews(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    assert run("pki", "init", str(d)).exit_code == 0
    out = str(tmp_path / "h")
    assert run("pki", "issue-host", "--ca-dir", str(d), "--ca", "eu-central", "--hostname", "h.example",
               "--out", out).exit_code == 0
    cert = f"{out}-cert.pem"
    assert run("cert", "verify", "--trust", str(d / "trust"), cert).exit_code == 0
    r = run("pki", "crl", "--ca-dir", str(d), "--ca", "eu-central", "--revoke", cert)
    assert r.exit_code == 0, r.output
    assert "CRL #2" in r.stdout and "1 revoked" in r.stdout  # `pki init` wrote #1 (empty)
    v = run("cert", "verify", "--trust", str(d / "trust"), "--json", cert)
    assert v.exit_code == 1 and [x["code"] for x in json.loads(v.stdout)["reasons"]] == ["cert.revoked"]
    r = run("pki", "crl", "--ca-dir", str(d), "--ca", "eu-central")  # renew: keeps the entry
    assert r.exit_code == 0 and "CRL #3" in r.stdout and "1 revoked" in r.stdout
    assert run("cert", "verify", "--trust", str(d / "trust"), cert).exit_code == 1
    us_crl = (d / "trust" / "us-east-ca.crl").read_bytes()
    r = run("pki", "crl", "--ca-dir", str(d), "--ca", "us-east", "--revoke", cert)
    assert r.exit_code == 2 and "not issued by Escort us-east CA" in r.stderr
    assert (d / "trust" / "us-east-ca.crl").read_bytes() == us_crl
    assert run("pki", "crl", "--ca-dir", str(d), "--ca", "owners").exit_code == 0
    assert (d / "owners" / "owners-ca.crl").exists()
