"""Every hole in issue 9's "Why", with certificates and CRLs made by the ``openssl`` CLI.

Each case runs through BOTH ``escort cert verify --json`` and ``escort explain
--offline --json`` (real processes, the installed entry point) on a small fleet whose
only target host carries the case's certificate, and both must give the same reason
codes: one verdict everywhere.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from console.core import issuance as iss
from console.core import policy as pol

from . import ossl
from .trustkit import empty_crl, fp, make_kit

HIGH = iss.DEFAULT_POLICY_NAMES["assurance:high"]
VM_UUID = "8a1c1e1a-8d7b-4c36-9d61-2a3f6a0b9e42"
ESCORT = str(Path(sys.executable).parent / "escort")
CRIT = "1.2.3.4.5.6.7=critical,ASN1:UTF8String:do not ignore me"


@dataclass
class Base:
    d: Path
    tree: ossl.Tree
    root: ossl.CA
    int: ossl.CA
    owners: Path  # owners' trust dir (issuance-made owners' CA + CRL)
    policy_low: Path  # VM policy: trusts the openssl root, requires country DE
    policy_high: Path  # ... and certificate policy assurance:high


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    if shutil.which("openssl") is None:  # pragma: no cover - openssl is a dev dependency (deps/)
        pytest.fail("openssl CLI missing")
    d = tmp_path_factory.mktemp("why")
    tree = ossl.Tree(d)
    root = tree.root("root", "/O=Acme/CN=Acme Root CA")
    inter = tree.ca(root, "int", "/O=Acme/CN=Acme Issuing CA", ext=[f"certificatePolicies={HIGH}"])
    tree.crl(root, "root.crl")
    tree.crl(inter, "int.crl")
    kit = make_kit()
    owners = d / "owners"
    owners.mkdir()
    (owners / "owners-ca.pem").write_bytes(iss.cert_pem(kit.owners_ca.cert))
    (owners / "owners-ca.crl").write_bytes(empty_crl(kit.owners_ca))
    now = dt.datetime.now(dt.UTC)
    root_fp = fp(iss.x509.load_pem_x509_certificate(root.pem.read_bytes()))

    def policy(name: str, require: dict[str, list[str]]) -> Path:
        payload = pol.build_policy_payload(
            owner=kit.alice.email, vm_uuid=VM_UUID, vm_name="app-1", trusted_cas=[("Acme Root", root_fp)],
            require=require, not_before=now - dt.timedelta(hours=1), not_after=now + dt.timedelta(days=30))
        path = d / f"{name}.jws"
        path.write_text(pol.sign_policy(payload, kit.alice.key, kit.alice.chain))
        return path

    return Base(d, tree, root, inter, owners, policy("low", {"country": ["DE"]}),
                policy("high", {"country": ["DE"], "policies": ["assurance:high"]}))


def trust_dir(base: Base, case: str, files: dict[str, Path]) -> Path:
    """A trust directory for one case: the given files under the given names."""
    t = base.d / f"trust-{case}"
    t.mkdir()
    for name, src in files.items():
        shutil.copy(src, t / name)
    return t


def standard(base: Base, case: str, **extra: Path) -> Path:
    return trust_dir(base, case, {"root.pem": base.root.pem, "root.crl": base.d / "root.crl",
                                  "int.pem": base.int.pem, "int.crl": base.d / "int.crl", **extra})


def cert_verify(trust: Path, cert: Path) -> tuple[int, dict[str, object]]:
    out = subprocess.run([ESCORT, "cert", "verify", "--trust", str(trust), "--json", str(cert)],
                         capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    assert "Traceback" not in out.stderr
    return out.returncode, json.loads(out.stdout)


def explain(base: Base, trust: Path, cert: Path, policy: Path) -> tuple[int, dict[str, object]]:
    fleet = trust.parent / f"{trust.name}.toml"
    fleet.write_text(f"""
name = "why"
kind = "real"
trust_dir = "{trust}"
owners_trust_dir = "{base.owners}"

[[hosts]]
name = "origin"

[[hosts]]
name = "target"
cert_file = "{cert}"

[[vms]]
uuid = "{VM_UUID}"
name = "app-1"
host = "origin"
policy_file = "{policy}"
""")
    out = subprocess.run([ESCORT, "explain", "--fleet", str(fleet), "--offline", "--json", "app-1", "target"],
                         capture_output=True, text=True)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def codes(data: dict[str, object]) -> set[str]:
    return {r["code"] for r in data["reasons"]}  # type: ignore[index, union-attr]


def same_verdict(base: Base, trust: Path, cert: Path, expected: set[str]) -> None:
    """cert verify and explain --offline give exactly ``expected`` (valid when empty)."""
    rc, verdict = cert_verify(trust, cert)
    assert codes(verdict) == expected, verdict
    assert rc == (0 if not expected else 1) and verdict["valid"] is (not expected)
    for r in verdict["reasons"]:  # type: ignore[attr-defined]
        assert r["message"] and r["fix"]
    rc2, decision = explain(base, trust, cert, base.policy_low)
    assert codes(decision) == expected, decision
    assert rc2 == rc and decision["allowed"] is (not expected)


def test_the_base_tree_is_valid_everywhere(base: Base) -> None:
    host = base.tree.host(base.int, "ok.acme.example", policies=HIGH)
    same_verdict(base, standard(base, "ok"), host, set())


def test_unknown_critical_extension_on_the_leaf(base: Base) -> None:
    host = base.tree.host(base.int, "crit.acme.example", policies=HIGH, extra=[CRIT])
    same_verdict(base, standard(base, "crit-leaf"), host, {"cert.critical_extension"})


def test_unknown_critical_extension_on_an_intermediate(base: Base) -> None:
    ca = base.tree.ca(base.root, "critca", "/O=Acme/CN=Acme Odd CA",
                      ext=[f"certificatePolicies={HIGH}", CRIT])
    crl = base.tree.crl(ca, "critca.crl")
    host = base.tree.host(ca, "odd.acme.example", policies=HIGH)
    same_verdict(base, standard(base, "crit-int", **{"critca.pem": ca.pem, "critca.crl": crl}), host,
                 {"ca.critical_extension"})


def test_host_certificate_that_is_a_ca(base: Base) -> None:
    host = base.tree.host(base.int, "ca.acme.example", policies=HIGH, ca_true=True)
    same_verdict(base, standard(base, "ca-leaf"), host, {"host.is_ca"})


def test_leading_dot_dns_constraint_means_subdomains_only(base: Base) -> None:
    ca = base.tree.ca(base.root, "dot", "/O=Acme/CN=Acme EU CA",
                      ext=[f"certificatePolicies={HIGH}",
                           "nameConstraints=critical,permitted;DNS:.eu.example.net"])
    crl = base.tree.crl(ca, "dot.crl")
    trust = standard(base, "dot", **{"dot.pem": ca.pem, "dot.crl": crl})
    inside = base.tree.host(ca, "hv1.eu.example.net", policies=HIGH)
    same_verdict(base, trust, inside, set())  # accepted (OpenSSL and Go read it the same way)
    apex = base.tree.host(ca, "eu.example.net", policies=HIGH)
    (trust.parent / "apex").mkdir()
    same_verdict(base, shutil.copytree(trust, trust.parent / "apex" / "t"), apex, {"name.constraints"})
    # ... the same chain from a chain file (CA not in the trust directory) is constrained too.
    full = base.d / "apex-full.pem"
    full.write_bytes(apex.read_bytes() + ca.pem.read_bytes())
    rc, verdict = cert_verify(standard(base, "dot-chainfile", **{"dot.crl": crl}), full)
    assert rc == 1 and codes(verdict) == {"name.constraints"}


def test_excluded_dns_and_ip_subtrees(base: Base) -> None:
    ca = base.tree.ca(base.root, "excl", "/O=Acme/CN=Acme No-Lab CA",
                      ext=[f"certificatePolicies={HIGH}",
                           "nameConstraints=critical,excluded;DNS:lab.example.net,excluded;IP:10.66.0.0/255.255.0.0"])
    crl = base.tree.crl(ca, "excl.crl")
    files = {"excl.pem": ca.pem, "excl.crl": crl}
    bad_dns = base.tree.host(ca, "hv9.lab.example.net", policies=HIGH)
    same_verdict(base, standard(base, "excl-dns", **files), bad_dns, {"name.constraints"})
    bad_ip = base.tree.host(ca, "hv8.example.net", policies=HIGH, san="DNS:hv8.example.net,IP:10.66.1.1")
    same_verdict(base, standard(base, "excl-ip", **files), bad_ip, {"name.constraints"})
    fine = base.tree.host(ca, "hv7.example.net", policies=HIGH)
    same_verdict(base, standard(base, "excl-ok", **files), fine, set())


def test_delta_crl_never_replaces_the_base(base: Base) -> None:
    """A delta CRL that lists nothing must not un-revoke a host the base CRL revokes."""
    ca = base.tree.ca(base.root, "dca", "/O=Acme/CN=Acme Delta CA", ext=[f"certificatePolicies={HIGH}"])
    host = base.tree.host(ca, "revoked.acme.example", policies=HIGH)
    delta = base.tree.crl(ca, "dca-delta.crl", ext=["2.5.29.27=critical,DER:02:01:01"], number=2)  # empty
    base.tree.revoke(ca, host)
    full = base.tree.crl(ca, "dca-base.crl", number=1)
    trust = standard(base, "delta", **{"dca.pem": ca.pem, "dca-base.crl": full, "dca-delta.crl": delta})
    same_verdict(base, trust, host, {"cert.revoked"})
    # Alone, the delta is ignored with a visible warning and nothing else is usable.
    alone = standard(base, "delta-alone", **{"dca.pem": ca.pem, "dca-delta.crl": delta})
    rc, verdict = cert_verify(alone, host)
    assert rc == 1 and codes(verdict) == {"revocation.missing"}
    assert "crl.delta_ignored" in {p["code"] for p in verdict["problems"]}  # type: ignore[attr-defined]


def test_stale_crl_refuses(base: Base) -> None:
    ca = base.tree.ca(base.root, "sca", "/O=Acme/CN=Acme Stale CA", ext=[f"certificatePolicies={HIGH}"])
    now = dt.datetime.now(dt.UTC)
    last, nxt = now - dt.timedelta(days=10), now - dt.timedelta(days=3)
    crl = base.tree.crl(ca, "sca.crl", last=f"{last:%Y%m%d%H%M%SZ}", nxt=f"{nxt:%Y%m%d%H%M%SZ}")
    host = base.tree.host(ca, "stale.acme.example", policies=HIGH)
    same_verdict(base, standard(base, "stale", **{"sca.pem": ca.pem, "sca.crl": crl}), host,
                 {"revocation.stale"})


def test_forged_crl_refuses(base: Base) -> None:
    """A CRL naming the issuing CA but signed by another key: forged, so revocation is unknown."""
    evil_tree = ossl.Tree(base.d / "evil")
    (base.d / "evil").mkdir()
    evil = evil_tree.root("int", "/O=Acme/CN=Acme Issuing CA")  # same name, other key
    forged = evil_tree.crl(evil, "forged.crl")
    host = base.tree.host(base.int, "forged.acme.example", policies=HIGH)
    trust = trust_dir(base, "forged", {"root.pem": base.root.pem, "root.crl": base.d / "root.crl",
                                       "int.pem": base.int.pem, "int.crl": forged})
    same_verdict(base, trust, host, {"revocation.unusable"})
    _, verdict = cert_verify(trust, host)
    assert "crl.wrong_issuer" in {p["code"] for p in verdict["problems"]}  # type: ignore[attr-defined]


def test_crl_with_an_unknown_critical_extension_is_unusable(base: Base) -> None:
    ca = base.tree.ca(base.root, "cca", "/O=Acme/CN=Acme Odd CRL CA", ext=[f"certificatePolicies={HIGH}"])
    crl = base.tree.crl(ca, "cca.crl", ext=[CRIT])
    host = base.tree.host(ca, "oddcrl.acme.example", policies=HIGH)
    trust = standard(base, "crl-crit", **{"cca.pem": ca.pem, "cca.crl": crl})
    same_verdict(base, trust, host, {"revocation.unusable"})
    _, verdict = cert_verify(trust, host)
    assert "crl.critical_extension" in {p["code"] for p in verdict["problems"]}  # type: ignore[attr-defined]


def test_placement_policy_counts_only_when_every_ca_asserts_it(base: Base) -> None:
    """An intermediate that never asserted assurance:high cannot mint "high" hosts."""
    ca = base.tree.ca(base.root, "npca", "/O=Acme/CN=Acme Low CA")  # no certificatePolicies
    crl = base.tree.crl(ca, "npca.crl")
    host = base.tree.host(ca, "claims-high.acme.example", policies=HIGH)
    trust = standard(base, "nopol", **{"npca.pem": ca.pem, "npca.crl": crl})
    rc, verdict = cert_verify(trust, host)
    assert rc == 0 and verdict["policies"] == []  # a valid certificate, but HIGH does not count
    rc2, decision = explain(base, trust, host, base.policy_high)
    assert rc2 == 1 and codes(decision) == {"attr.policy"}
    assert "not every CA" in next(r["message"] for r in decision["reasons"])  # type: ignore[union-attr]
    good = base.tree.host(base.int, "high.acme.example", policies=HIGH)
    rc3, decision = explain(base, standard(base, "pol-ok"), good, base.policy_high)
    assert rc3 == 0 and decision["allowed"] is True


def test_zero_and_negative_serials_are_refused_in_one_line(base: Base) -> None:
    """RFC 5280 serials are positive; openssl issues and verifies zero and negative ones, and
    cryptography loads them with a deprecation warning (a future release will refuse them).
    escort refuses them now: one line with the fix, no Python warning at the user, and the same
    refusal from ``cert verify``, ``explain`` and a trust directory."""
    zero = base.tree.host(base.int, "zero.acme.example", policies=HIGH, serial=0)
    assert "serial=00" in ossl.run(base.d, "x509", "-in", str(zero), "-noout", "-serial")
    ossl.run(base.d, "verify", "-CAfile", str(base.root.pem), "-untrusted", str(base.int.pem), str(zero))
    trust = standard(base, "serial")
    out = subprocess.run([ESCORT, "cert", "verify", "--trust", str(trust), str(zero)],
                         capture_output=True, text=True)
    assert out.returncode == 2, out
    assert out.stderr.count("\n") == 1 and "serial number 0 is not positive" in out.stderr
    assert "Warning" not in out.stderr and "Traceback" not in out.stderr
    explain(base, trust, base.tree.host(base.int, "fine.acme.example", policies=HIGH), base.policy_low)
    fleet = trust.parent / f"{trust.name}.toml"  # written by explain(); now the zero-serial host
    fleet.write_text(fleet.read_text().replace(str(base.d / "fine.acme.example.pem"), str(zero)))
    out = subprocess.run([ESCORT, "explain", "--fleet", str(fleet), "--offline", "app-1", "target"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out  # unusable input, as elsewhere
    assert "serial number 0 is not positive" in out.stderr and "Warning" not in out.stderr
    # a CA with a negative serial in the trust directory: a problem with that file, never an anchor
    neg = base.tree.ca(base.root, "negca", "/O=Acme/CN=Acme Negative CA",
                       ext=[f"certificatePolicies={HIGH}"], serial=-7)
    crl = base.tree.crl(neg, "negca.crl")
    host = base.tree.host(neg, "under-neg.acme.example", policies=HIGH)
    trust = standard(base, "negca", **{"negca.pem": neg.pem, "negca.crl": crl})
    out = subprocess.run([ESCORT, "cert", "verify", "--trust", str(trust), "--json", str(host)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "Warning" not in out.stderr, out
    verdict = json.loads(out.stdout)
    assert verdict["valid"] is False and "chain.no_issuer" in codes(verdict)
    assert [p["code"] for p in verdict["problems"] if "serial number -7 is not positive" in p["message"]] \
        == ["file.invalid"]
    rc, decision = explain(base, trust, host, base.policy_low)
    assert rc == 1 and decision["allowed"] is False and "chain.no_issuer" in codes(decision)
