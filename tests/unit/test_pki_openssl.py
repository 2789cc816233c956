"""Certificates made with the ``openssl`` CLI (a "bring your own CA" organisation).

A root (RSA, ``openssl req -x509``), an intermediate (EC, ``openssl x509 -req``,
stored as DER), host certificates from ``openssl ca`` with SAN, EKU and
certificatePolicies, one of them revoked, and a CRL from ``openssl ca -gencrl``.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from console.adapters import files
from console.cli import main
from console.core import issuance as iss
from console.core import pki

HIGH = iss.DEFAULT_POLICY_NAMES["assurance:high"]

CA_CNF = f"""
[ ca ]
default_ca = CA_default
[ CA_default ]
dir = .
database = $dir/index.txt
new_certs_dir = $dir/newcerts
certificate = $dir/int.pem
private_key = $dir/int.key
serial = $dir/serial
crlnumber = $dir/crlnumber
default_md = sha256
default_days = 365
default_crl_days = 30
policy = policy_any
unique_subject = no
copy_extensions = none
[ policy_any ]
countryName = optional
stateOrProvinceName = optional
localityName = optional
organizationName = optional
organizationalUnitName = optional
commonName = supplied
[ host_ext ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = DNS:$ENV::HOSTNAME,IP:192.0.2.10
certificatePolicies = {HIGH}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[ server_only_ext ]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:$ENV::HOSTNAME
authorityKeyIdentifier = keyid
"""

INT_EXT = f"""basicConstraints=critical,CA:TRUE,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid:always
certificatePolicies={HIGH}
"""


@dataclass
class OpensslPKI:
    base: Path
    trust: Path  # root.pem + root.crl + int.der + int.crl
    host: Path  # valid: EC key, SAN + EKU + policies
    ed_host: Path  # valid, Ed25519 key
    revoked: Path  # listed on int.crl
    server_only: Path  # lacks clientAuth
    sha1: Path  # signed with SHA-1


def _run(cwd: Path, *args: str, env: dict[str, str] | None = None) -> None:
    import os

    full_env = {**os.environ, "HOSTNAME": "unused.example", **(env or {})}
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, env=full_env)
    assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr}"


@pytest.fixture(scope="module")
def openssl_pki(tmp_path_factory: pytest.TempPathFactory) -> OpensslPKI:
    d = tmp_path_factory.mktemp("openssl")
    (d / "newcerts").mkdir()
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(CA_CNF)
    (d / "int.ext").write_text(INT_EXT)
    (d / "sha1.ext").write_text("subjectKeyIdentifier=hash\n")  # no keyUsage/EKU: reported too
    _run(d, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root.key", "-out", "root.pem",
         "-days", "3650", "-subj", "/C=DE/O=Acme/CN=Acme Root CA",
         "-addext", "basicConstraints=critical,CA:TRUE,pathlen:1",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    _run(d, "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
         "-keyout", "int.key", "-out", "int.csr", "-subj", "/C=DE/O=Acme/CN=Acme Frankfurt CA")
    _run(d, "x509", "-req", "-in", "int.csr", "-CA", "root.pem", "-CAkey", "root.key",
         "-CAcreateserial", "-out", "int.pem", "-days", "1825", "-extfile", "int.ext", "-sha256")

    def host(name: str, ext: str = "host_ext", key: str = "ec") -> Path:
        if key == "ed25519":
            _run(d, "genpkey", "-algorithm", "ed25519", "-out", f"{name}.key")
        else:
            _run(d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                 f"{name}.key")
        _run(d, "req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/C=DE/ST=Hessen/L=Frankfurt/O=Acme/OU=Compute/CN={name}")
        _run(d, "ca", "-batch", "-config", "ca.cnf", "-extensions", ext, "-in", f"{name}.csr",
             "-out", f"{name}.pem", "-notext", env={"HOSTNAME": name})
        return d / f"{name}.pem"

    good = host("h1.acme.example")
    ed = host("h2.acme.example", key="ed25519")
    bad = host("h3.acme.example")
    server_only = host("h4.acme.example", ext="server_only_ext")
    _run(d, "ca", "-config", "ca.cnf", "-revoke", str(bad), "-crl_reason", "keyCompromise")
    _run(d, "ca", "-config", "ca.cnf", "-gencrl", "-out", "int.crl")
    # The root publishes a CRL too (for the intermediate): revocation fails closed without one.
    (d / "root-index.txt").write_text("")
    (d / "root-crlnumber").write_text("01\n")
    (d / "root.cnf").write_text(CA_CNF.replace("$dir/int.pem", "$dir/root.pem")
                                .replace("$dir/int.key", "$dir/root.key")
                                .replace("$dir/index.txt", "$dir/root-index.txt")
                                .replace("$dir/crlnumber", "$dir/root-crlnumber"))
    _run(d, "ca", "-config", "root.cnf", "-gencrl", "-out", "root.crl")
    _run(d, "x509", "-req", "-in", "h1.acme.example.csr", "-CA", "int.pem", "-CAkey", "int.key",
         "-set_serial", "77", "-out", "sha1.pem", "-days", "30", "-sha1", "-extfile", "sha1.ext")
    _run(d, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-sha1",
         "-keyout", "old.key", "-out", "old-root.pem", "-days", "3650", "-subj", "/CN=Old SHA-1 Root")
    trust = d / "trust"
    trust.mkdir()
    (trust / "root.pem").write_bytes((d / "root.pem").read_bytes())
    _run(d, "x509", "-in", "int.pem", "-outform", "der", "-out", str(trust / "int.der"))
    (trust / "int.crl").write_bytes((d / "int.crl").read_bytes())
    (trust / "root.crl").write_bytes((d / "root.crl").read_bytes())
    return OpensslPKI(d, trust, good, ed, bad, server_only, d / "sha1.pem")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _cert(path: Path) -> pki.x509.Certificate:
    return pki.load_certificate(path.read_bytes(), str(path))


def _store(p: OpensslPKI) -> pki.TrustStore:
    store, problems = files.load_trust_store(p.trust, _now())
    assert problems == []
    return store


def test_tree_from_openssl_files(openssl_pki: OpensslPKI) -> None:
    store = _store(openssl_pki)
    assert [a.info.name for a in store.anchors] == ["Acme Root CA"]
    assert store.anchors[0].info.key_type == "RSA 2048"
    (child,) = store.anchors[0].children
    assert child.info.name == "Acme Frankfurt CA" and child.info.key_type == "EC P-256"
    assert child.crl is not None and len(child.crl.revoked) == 1


def test_openssl_host_certificates(openssl_pki: OpensslPKI) -> None:
    store = _store(openssl_pki)
    now = _now()
    for path in (openssl_pki.host, openssl_pki.ed_host):
        result = store.verify_host(_cert(path), now)
        assert result.valid, result.reasons
        assert [c.name for c in result.chain] == [path.stem, "Acme Frankfurt CA", "Acme Root CA"]
        assert result.policies == {HIGH}  # the intermediate asserts it too
    revoked = store.verify_host(_cert(openssl_pki.revoked), now)
    assert [r.code for r in revoked.reasons] == ["cert.revoked"]
    assert store.issuer_of(_cert(openssl_pki.revoked)) is not None
    server_only = store.verify_host(_cert(openssl_pki.server_only), now)
    assert [r.code for r in server_only.reasons] == ["host.eku"]


def test_openssl_sha1_and_no_extensions(openssl_pki: OpensslPKI) -> None:
    result = _store(openssl_pki).verify_host(_cert(openssl_pki.sha1), _now())
    assert {r.code for r in result.reasons} == {"chain.weak_signature", "host.keyusage", "host.eku"}


def test_openssl_host_attributes(openssl_pki: OpensslPKI) -> None:
    attrs = pki.host_attributes(_cert(openssl_pki.host))
    assert (attrs.country, attrs.state, attrs.locality, attrs.organization, attrs.org_unit) == (
        "DE", "Hessen", "Frankfurt", "Acme", "Compute")
    assert attrs.dns_names == ("h1.acme.example",) and attrs.ips == ("192.0.2.10",)
    assert attrs.policies == frozenset({"assurance:high"})


def test_cert_verify_cli_on_openssl_certs(openssl_pki: OpensslPKI) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["cert", "verify", "--trust", str(openssl_pki.trust), "--json",
                              str(openssl_pki.host)])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["valid"] is True and data["reasons"] == []
    assert data["chain"] == ["CN=h1.acme.example,OU=Compute,O=Acme,L=Frankfurt,ST=Hessen,C=DE",
                             "CN=Acme Frankfurt CA,O=Acme,C=DE", "CN=Acme Root CA,O=Acme,C=DE"]
    bad = runner.invoke(main, ["cert", "verify", "--trust", str(openssl_pki.trust), str(openssl_pki.revoked)])
    assert bad.exit_code == 1
    assert "cert.revoked:" in bad.stdout and "Fix:" in bad.stdout


def test_cert_verify_as_a_real_process(openssl_pki: OpensslPKI) -> None:
    """The installed entry point: exit codes and JSON on stdout, one line on stderr."""
    escort = Path(sys.executable).parent / "escort"
    assert escort.exists(), "the escort entry point is not installed (pip install -e .)"
    cmd = [str(escort), "cert", "verify", "--trust", str(openssl_pki.trust)]
    ok = subprocess.run([*cmd, "--json", str(openssl_pki.ed_host)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) >= {"valid", "reasons", "chain"}
    bad = subprocess.run([*cmd, "--json", str(openssl_pki.server_only)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert [r["code"] for r in json.loads(bad.stdout)["reasons"]] == ["host.eku"]
    unusable = subprocess.run([*cmd, str(openssl_pki.trust / "int.crl")], capture_output=True, text=True)
    assert unusable.returncode == 2
    assert unusable.stderr.strip().count("\n") == 0 and "is a CRL, expected a certificate" in unusable.stderr
    assert "Traceback" not in unusable.stderr


def test_sha1_self_signed_root_is_still_an_anchor(openssl_pki: OpensslPKI) -> None:
    """An anchor's self-signature carries no trust; cryptography just cannot check SHA-1."""
    data = (openssl_pki.base / "old-root.pem").read_bytes()
    store, problems = pki.TrustStore.build([("old-root.pem", data)], at=_now())
    assert problems == [] and [a.info.name for a in store.anchors] == ["Old SHA-1 Root"]
