"""console.core.pki: parsing, the CA tree and every host/owner chain check."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from console.core import issuance as iss
from console.core import pki
from console.core.errors import InputError
from console.core.pki import TrustStore

from . import xcheck
from .conftest import DEMO_START, DemoPKI


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def codes(result: pki.ChainResult) -> set[str]:
    return {r.code for r in result.reasons}


def custom_cert(subject: str, key: iss.PrivateKey, issuer: iss.Issuer | None, *, ca: bool,
                path_len: int | None = None, key_cert_sign: bool = True,
                start: dt.datetime = DEMO_START, days: int = 365, ku: bool = True,
                eku: list[x509.ObjectIdentifier] | None = None, public_key: object | None = None,
                sans: list[x509.GeneralName] | None = None,
                hash_algo: hashes.HashAlgorithm | None = None) -> x509.Certificate:
    """A certificate with exactly the extensions a test wants (issuance.py is too kind)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer_key = issuer.key if issuer else key
    pub = public_key if public_key is not None else key.public_key()
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer.cert.subject if issuer else name)
         .public_key(pub)  # type: ignore[arg-type]
         .serial_number(x509.random_serial_number())
         .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_len if ca else None), critical=True))
    if ku:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=not ca,
            data_encipherment=False, key_agreement=False, key_cert_sign=ca and key_cert_sign,
            crl_sign=ca, encipher_only=False, decipher_only=False), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    algo = hash_algo if hash_algo is not None else iss._hash_for(signer_key)
    return b.sign(signer_key, algo)  # type: ignore[arg-type]


BOTH = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


# --------------------------------------------------------------------------- parsing

class TestLoad:
    def test_pem_and_der_are_detected(self, demo_pki: DemoPKI) -> None:
        cert = demo_pki.root.cert
        assert pki.load_certificate(iss.cert_pem(cert), "a.pem") == cert
        assert pki.load_certificate(der(cert), "a.der") == cert

    def test_pem_bundle_gives_every_certificate(self, demo_pki: DemoPKI) -> None:
        bundle = b"some text\n" + iss.cert_pem(demo_pki.root.cert) + iss.cert_pem(demo_pki.owners.cert)
        assert pki.load_certificates(bundle, "b.pem") == [demo_pki.root.cert, demo_pki.owners.cert]

    @pytest.mark.parametrize(("data", "needle"), [
        (b"", "empty file"),
        (b"-----BEGIN CERTIFICATE-----\nMIIB!!!notbase64\n-----END CERTIFICATE-----\n", "malformed PEM"),
        (b"-----BEGIN CERTIFICATE-----\nMIIBaaaa\n", "without a matching END"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END X509 CRL-----\n", "malformed PEM"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid X.509"),
        (b"\x00\x01binary junk", "neither PEM nor DER"),
        (b"just some text\n", "neither PEM nor DER"),
    ])
    def test_bad_certificate_input_is_one_line(self, data: bytes, needle: str) -> None:
        with pytest.raises(InputError) as err:
            pki.load_certificate(data, "bad.pem")
        assert needle in str(err.value)
        assert str(err.value).startswith("bad.pem: ")
        assert "\n" not in str(err.value)

    def test_crl_where_a_certificate_belongs(self, demo_pki: DemoPKI) -> None:
        crl_pem = demo_pki.crl(demo_pki.root)
        with pytest.raises(InputError, match=r"x.pem: is a CRL, expected a certificate"):
            pki.load_certificate(crl_pem, "x.pem")
        crl_der = pki.load_crl(crl_pem, "x").public_bytes(serialization.Encoding.DER)
        with pytest.raises(InputError, match=r"is a CRL \(DER\), expected a certificate"):
            pki.load_certificate(crl_der, "x.der")

    def test_certificate_where_a_crl_belongs(self, demo_pki: DemoPKI) -> None:
        with pytest.raises(InputError, match=r"c.crl: is a certificate, expected a CRL"):
            pki.load_crl(iss.cert_pem(demo_pki.root.cert), "c.crl")
        with pytest.raises(InputError, match=r"is a certificate \(DER\), expected a CRL"):
            pki.load_crl(der(demo_pki.root.cert), "c.crl")

    def test_private_key_and_csr_are_named(self, demo_pki: DemoPKI) -> None:
        with pytest.raises(InputError, match="contains a private key"):
            pki.load_certificate(iss.key_pem(demo_pki.root.key), "k.pem")
        key_der = demo_pki.root.key.private_bytes(serialization.Encoding.DER,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption())
        with pytest.raises(InputError, match=r"contains a private key.*\(DER\)"):
            pki.load_certificate(key_der, "k.der")
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
               .sign(demo_pki.root.key, hashes.SHA256()))
        with pytest.raises(InputError, match="certificate request"):
            pki.load_certificate(csr.public_bytes(serialization.Encoding.PEM), "r.pem")

    def test_der_where_pem_is_required(self, demo_pki: DemoPKI) -> None:
        with pytest.raises(InputError, match="DER \\(binary\\) data where PEM was expected"):
            pki.load_certificate(der(demo_pki.root.cert), "ca-cert.pem", require_pem=True)
        assert pki.load_certificate(iss.cert_pem(demo_pki.root.cert), "x", require_pem=True)

    def test_crl_pem_and_der(self, demo_pki: DemoPKI) -> None:
        pem = demo_pki.crl(demo_pki.root, [5])
        crl = pki.load_crl(pem, "r.crl")
        assert pki.load_crl(crl.public_bytes(serialization.Encoding.DER), "r.der").issuer == crl.issuer
        with pytest.raises(InputError, match="malformed PEM"):
            pki.load_crl(b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "r.crl")


# --------------------------------------------------------------------------- facts

class TestFacts:
    @pytest.mark.parametrize(("kind", "expected"), [("ec", "EC P-256"), ("rsa", "RSA 2048"),
                                                    ("ed25519", "Ed25519")])
    def test_cert_info(self, make_demo_pki: Callable[[str], DemoPKI], kind: str, expected: str) -> None:
        demo = make_demo_pki(kind)
        info = pki.cert_info(demo.regions["eu-west"].cert, "eu-west-ca.pem")
        assert info.name == "Escort eu-west CA"
        assert "C=FR" in info.subject and info.issuer == "CN=Escort Demo Root CA,O=Escort Demo"
        assert info.key_type == expected
        assert info.is_ca and info.path_len == 0 and info.constraints == "CA, pathLen 0"
        assert len(info.fingerprint) == 64 and len(info.fingerprint_sha1) == 40
        assert info.fingerprint == demo.regions["eu-west"].cert.fingerprint(hashes.SHA256()).hex()
        assert "keyCertSign" in info.key_usage and info.source == "eu-west-ca.pem"
        assert info.ski and info.aki == pki.cert_info(demo.root.cert).ski

    def test_host_cert_info_and_name_constraints_summary(self, demo_pki: DemoPKI) -> None:
        cert, _ = demo_pki.host()
        info = pki.cert_info(cert)
        assert not info.is_ca and info.constraints == "not a CA"
        assert info.ext_key_usage == ("serverAuth", "clientAuth")
        assert info.policies == (iss.DEFAULT_POLICY_NAMES["assurance:high"],)
        key = iss.make_key()
        nc = iss.NameConstraints(permitted_dns=["eu.example"], excluded_ips=["10.9.0.0/16"])
        ca = iss.issue_ca(iss.CASpec(iss.Subject("NC CA"), name_constraints=nc), key,
                          iss.Validity.days(10, start=DEMO_START), issuer=demo_pki.root.issuer)
        assert pki.cert_info(ca).name_constraints == "permit DNS:eu.example; exclude IP:10.9.0.0/16"

    def test_host_attributes(self, demo_pki: DemoPKI) -> None:
        cert, _ = demo_pki.host("h7.example", "eu-west", ips=["10.0.0.7", "fd00::7"], dns=["alt.example"],
                                site="Paris", policies=("assurance:high", "1.2.3.4"))
        attrs = pki.host_attributes(cert)
        assert (attrs.common_name, attrs.country, attrs.locality, attrs.organization) == (
            "h7.example", "FR", "Paris", "Escort Demo")
        assert attrs.dns_names == ("h7.example", "alt.example")
        assert attrs.ips == ("10.0.0.7", "fd00::7")
        assert attrs.policies == frozenset({"assurance:high", "1.2.3.4"})
        assert attrs.not_after == cert.not_valid_after_utc
        assert attrs.days_to_expiry(DEMO_START) == 365
        named = pki.host_attributes(cert, {"tier:gold": "1.2.3.4"})
        assert named.policies == frozenset({"assurance:high", "tier:gold"})


# --------------------------------------------------------------------------- the tree

class TestTree:
    def test_anchors_parents_children(self, demo_pki: DemoPKI) -> None:
        store, problems = demo_pki.build(demo_pki.trust_files(), at=demo_pki.at)
        assert problems == []
        assert [a.info.name for a in store.anchors] == ["Escort Demo Root CA"]
        root = store.anchors[0]
        assert sorted(c.info.name for c in root.children) == [
            "Escort eu-central CA", "Escort eu-west CA", "Escort us-east CA"]
        node = store.by_fingerprint(pki.cert_info(demo_pki.regions["us-east"].cert).fingerprint)
        assert node is not None and node.parent is root
        assert [n.info.name for n in node.path_to_root()] == ["Escort us-east CA", "Escort Demo Root CA"]
        assert len(store.nodes()) == 4
        host, _ = demo_pki.host()
        assert store.issuer_of(host) is store.by_fingerprint(
            pki.cert_info(demo_pki.regions["eu-central"].cert).fingerprint)

    def test_status_words(self, demo_pki: DemoPKI) -> None:
        store = demo_pki.store()
        root = store.anchors[0]
        assert root.status(demo_pki.at) == "valid"
        end = root.info.not_after
        assert root.status(end - dt.timedelta(days=3)) == "expiring"
        assert root.status(end + dt.timedelta(seconds=1)) == "expired"
        assert root.status(root.info.not_before - dt.timedelta(days=1)) == "not yet valid"
        eu = demo_pki.regions["eu-central"]
        revoked = demo_pki.store([("root.crl", demo_pki.crl(demo_pki.root, [eu.cert.serial_number]))])
        node = revoked.by_fingerprint(pki.cert_info(eu.cert).fingerprint)
        assert node is not None and node.revoked and node.status(demo_pki.at) == "revoked"
        alone, problems = demo_pki.build([("eu.pem", iss.cert_pem(eu.cert))], at=demo_pki.at)
        assert alone.nodes()[0].status(demo_pki.at) == "untrusted"
        assert [p.reason.code for p in problems] == ["trust.no_root"]

    def test_check_ca(self, demo_pki: DemoPKI) -> None:
        eu = demo_pki.regions["eu-central"]
        store = demo_pki.store([("root.crl", demo_pki.crl(demo_pki.root, [eu.cert.serial_number]))])
        node = store.issuer_of(demo_pki.host()[0])
        assert node is not None
        result = store.check_ca(node, demo_pki.at)
        assert codes(result) == {"ca.revoked"}
        assert [c.name for c in result.chain] == ["Escort eu-central CA", "Escort Demo Root CA"]
        assert store.check_ca(store.anchors[0], demo_pki.at).valid
        late = store.anchors[0].info.not_after + dt.timedelta(days=1)
        assert codes(store.check_ca(store.anchors[0], late)) == {"ca.expired"}

    def test_no_ca_at_all_raises(self, demo_pki: DemoPKI) -> None:
        host, _ = demo_pki.host()
        with pytest.raises(InputError, match="no CA certificates"):
            demo_pki.build([("h.pem", iss.cert_pem(host))], at=demo_pki.at)
        with pytest.raises(InputError, match="no CA certificates"):
            demo_pki.build([("bad.pem", b"nope")], at=demo_pki.at)

    def test_bad_files_are_problems_not_failures(self, demo_pki: DemoPKI) -> None:
        host, _ = demo_pki.host()
        files = [*demo_pki.trust_files(), ("junk.pem", b"-----BEGIN CERTIFICATE-----\n!!\n"),
                 ("host.pem", iss.cert_pem(host)), ("dup.pem", iss.cert_pem(demo_pki.root.cert))]
        store, problems = demo_pki.build(files, at=demo_pki.at)
        assert {(p.source, p.reason.code) for p in problems} == {
            ("junk.pem", "file.invalid"), ("host.pem", "trust.not_ca")}
        assert len(store.anchors) == 1  # the duplicate root is merged

    def test_ca_with_a_forged_signature(self, demo_pki: DemoPKI) -> None:
        """An intermediate that names the root as issuer but was signed by another key."""
        key = iss.make_key()
        forged = iss.issue_ca(iss.CASpec(iss.Subject("Forged CA")), key,
                              iss.Validity.days(30, start=DEMO_START),
                              issuer=iss.Issuer(demo_pki.root.cert, iss.make_key()))
        store, problems = demo_pki.build([*demo_pki.trust_files(), ("forged.pem", iss.cert_pem(forged))],
                                         at=demo_pki.at, missing_crl="warn")
        assert [(p.source, p.reason.code) for p in problems] == [("forged.pem", "trust.signature")]
        host, _ = demo_pki.host(issuer=iss.Issuer(forged, key))
        result = store.verify_host(host, demo_pki.at)
        assert codes(result) == {"chain.no_anchor"} and "does not verify" in result.reasons[0].message

    @pytest.mark.timeout(30)  # a loop that is followed forever fails here, not by a clock
    def test_cross_signed_loop_is_reported_and_terminates(self, demo_pki: DemoPKI) -> None:
        ka, kb = iss.make_key(), iss.make_key()
        v = iss.Validity.days(100, start=DEMO_START)
        b0 = iss.issue_ca(iss.CASpec(iss.Subject("Loop B")), kb, v)
        a = iss.issue_ca(iss.CASpec(iss.Subject("Loop A")), ka, v, issuer=iss.Issuer(b0, kb))
        b = iss.issue_ca(iss.CASpec(iss.Subject("Loop B")), kb, v, issuer=iss.Issuer(a, ka))
        store, problems = demo_pki.build([("a.pem", iss.cert_pem(a)), ("b.pem", iss.cert_pem(b))],
                                           at=demo_pki.at)
        loops = [p for p in problems if p.reason.code == "trust.loop"]
        assert len(loops) == 1 and "Loop A" in loops[0].reason.message and "Loop B" in loops[0].reason.message
        assert store.anchors == []
        assert all(n.status(demo_pki.at) == "untrusted" for n in store.nodes())
        assert all(len(n.path_to_root()) == 2 for n in store.nodes())
        leaf, _ = demo_pki.host(issuer=iss.Issuer(a, ka))
        result = store.verify_host(leaf, demo_pki.at)
        assert not result.valid and "chain.no_anchor" in codes(result)
        assert any("loop" in r.message for r in result.reasons)

    def test_cross_signed_with_a_root_is_fine(self, demo_pki: DemoPKI) -> None:
        """X is cross-signed by the demo root and by a second root: no loop, a valid path."""
        kx, k2 = iss.make_key(), iss.make_key()
        v = iss.Validity.days(100, start=DEMO_START)
        root2 = iss.issue_ca(iss.CASpec(iss.Subject("Other Root")), k2, v)
        x1 = iss.issue_ca(iss.CASpec(iss.Subject("Cross CA")), kx, v, issuer=demo_pki.root.issuer)
        x2 = iss.issue_ca(iss.CASpec(iss.Subject("Cross CA")), kx, v, issuer=iss.Issuer(root2, k2))
        # ... and root2 cross-signed by the Cross CA, which closes a loop through the roots.
        r2x = iss.issue_ca(iss.CASpec(iss.Subject("Other Root")), k2, v, issuer=iss.Issuer(x1, kx))
        store, problems = demo_pki.build(
            [*demo_pki.trust_files(), ("r2.pem", iss.cert_pem(root2)), ("x1.pem", iss.cert_pem(x1)),
             ("x2.pem", iss.cert_pem(x2)), ("r2x.pem", iss.cert_pem(r2x))], at=demo_pki.at,
            missing_crl="warn")
        assert problems == []
        leaf, _ = demo_pki.host(issuer=iss.Issuer(x1, kx))
        result = store.verify_host(leaf, demo_pki.at)
        assert result.valid, result.reasons
        assert result.chain[-1].name in ("Escort Demo Root CA", "Other Root")


# --------------------------------------------------------------------------- CRLs

class TestCRLs:
    def test_wrong_issuer(self, demo_pki: DemoPKI) -> None:
        eu, west = demo_pki.regions["eu-central"], demo_pki.regions["eu-west"]
        forged = iss.crl_pem(iss.issue_crl(iss.Issuer(eu.cert, west.key), [],
                                           iss.Validity.days(9, start=DEMO_START)))
        unknown_key = iss.make_key()
        stranger = iss.issue_ca(iss.CASpec(iss.Subject("Stranger")), unknown_key, iss.Validity.days(9))
        foreign = iss.crl_pem(iss.issue_crl(iss.Issuer(stranger, unknown_key), [],
                                            iss.Validity.days(9, start=DEMO_START)))
        future = demo_pki.crl(eu, start=demo_pki.at + dt.timedelta(days=1))
        host, _ = demo_pki.host()
        store, problems = TrustStore.build(
            demo_pki.trust_files(),
            [("forged.crl", forged), ("foreign.crl", foreign), ("future.crl", future),
             ("cert.crl", iss.cert_pem(host))], at=demo_pki.at)
        got = {(p.source, p.reason.code) for p in problems}
        assert got == {("forged.crl", "crl.wrong_issuer"), ("foreign.crl", "crl.unknown_issuer"),
                       ("future.crl", "crl.not_yet_valid"), ("cert.crl", "file.invalid")}
        assert "is a certificate, expected a CRL" in next(
            p.reason.message for p in problems if p.source == "cert.crl")
        assert all(n.crl is None for n in store.nodes())
        # Fail closed: eu-central's only CRLs are forged or from the future, so the
        # revocation status of its hosts is unknown, which refuses.
        result = store.verify_host(host, demo_pki.at)
        assert "revocation.unusable" in codes(result)
        assert "forged" in next(r.message for r in result.reasons if r.code == "revocation.unusable")

    def test_revoked_leaf(self, demo_pki: DemoPKI) -> None:
        host, _ = demo_pki.host()
        other, _ = demo_pki.host("h2.example")
        eu_crl = demo_pki.crl(demo_pki.regions["eu-central"], [host.serial_number])
        store = demo_pki.store([("eu.crl", eu_crl)])
        result = store.verify_host(host, demo_pki.at)
        assert codes(result) == {"cert.revoked"}
        assert store.verify_host(other, demo_pki.at).valid
        # Before the revocation date the certificate was fine.
        assert store.verify_host(host, DEMO_START - dt.timedelta(hours=1)).reasons[0].code != "cert.revoked"

    def test_revoked_intermediate(self, demo_pki: DemoPKI) -> None:
        eu = demo_pki.regions["eu-central"]
        store = demo_pki.store([("root.crl", demo_pki.crl(demo_pki.root, [eu.cert.serial_number]))])
        host, _ = demo_pki.host()
        assert codes(store.verify_host(host, demo_pki.at)) == {"ca.revoked"}
        west, _ = demo_pki.host(region="eu-west")
        assert store.verify_host(west, demo_pki.at).valid

    def test_stale_crl_refuses(self, demo_pki: DemoPKI) -> None:
        """A stale CRL means the revocation status is unknown: refused, not a warning."""
        eu = demo_pki.regions["eu-central"]
        stale = demo_pki.crl(eu, days=7)  # nextUpdate DEMO_START + 7 days < demo.at
        store, problems = demo_pki.build(demo_pki.trust_files(), [("eu.crl", stale)], at=demo_pki.at)
        assert [(p.reason.code, p.reason.severity) for p in problems] == [("crl.stale", "warning")]
        result = store.verify_host(demo_pki.host()[0], demo_pki.at)
        assert not result.valid
        assert codes(result) == {"revocation.stale"}
        assert result.reasons[0].fix.startswith("Fetch a current CRL")
        west = store.verify_host(demo_pki.host(region="eu-west")[0], demo_pki.at)
        assert west.valid and west.warnings == ()  # only chains through eu-central are affected
        # ... and before nextUpdate the same CRL is fine.
        early = store.verify_host(demo_pki.host()[0], DEMO_START + dt.timedelta(days=3))
        assert early.valid, early.reasons

    def test_newest_crl_wins_and_serials_are_indexed(self, demo_pki: DemoPKI) -> None:
        eu = demo_pki.regions["eu-central"]
        host, _ = demo_pki.host()
        old = demo_pki.crl(eu, [host.serial_number], number=1)
        serials = list(range(10_000, 15_000))
        new = demo_pki.crl(eu, serials, number=2)
        store = demo_pki.store([("old.crl", old), ("new.crl", new)])
        node = store.issuer_of(host)
        assert node is not None and node.crl is not None and node.crl.number == 2
        assert len(node.crl.revoked) == 5000
        assert store.verify_host(host, demo_pki.at).valid  # not on the newest CRL


# --------------------------------------------------------------------------- host checks

class TestHostChecks:
    @pytest.mark.parametrize("kind", ["ec", "rsa", "ed25519"])
    def test_valid_for_every_key_type(self, make_demo_pki: Callable[[str], DemoPKI], kind: str) -> None:
        demo = make_demo_pki(kind)
        for _ in range(2):  # the second round runs on the caches
            store, _ = demo.build(demo.trust_files(), at=demo.at)
            host, _ = demo.host(ips=["10.0.0.1"])
            result = store.verify_host(host, demo.at)
            assert result.valid, result.reasons
            assert [c.name for c in result.chain] == ["h1.example", "Escort eu-central CA",
                                                      "Escort Demo Root CA"]
            assert result.ca_fingerprints == {pki.cert_info(demo.root.cert).fingerprint,
                                              pki.cert_info(demo.regions["eu-central"].cert).fingerprint}
            assert result.leaf is not None and result.leaf.name == "h1.example"

    def test_mixed_key_types(self, make_demo_pki: Callable[[str], DemoPKI]) -> None:
        demo = make_demo_pki("ed25519")
        for kind in ("ec", "rsa"):
            host, _ = demo.host(key_type=kind)
            assert demo.store().verify_host(host, demo.at).valid

    def test_validity_windows(self, demo_pki: DemoPKI) -> None:
        store = demo_pki.store()
        host, _ = demo_pki.host(days=10)
        assert codes(store.verify_host(host, DEMO_START + dt.timedelta(days=11))) == {"cert.expired"}
        assert codes(store.verify_host(host, DEMO_START - dt.timedelta(days=1))) == {"cert.not_yet_valid"}
        ca_end = demo_pki.root.cert.not_valid_after_utc
        late, _ = demo_pki.host(start=ca_end - dt.timedelta(days=1), days=30)
        assert codes(store.verify_host(late, ca_end + dt.timedelta(days=1))) == {"ca.expired"}

    def test_expired_intermediate_only(self, demo_pki: DemoPKI) -> None:
        key = iss.make_key()
        short = iss.issue_ca(iss.CASpec(iss.Subject("Short CA")), key,
                             iss.Validity.days(5, start=DEMO_START), issuer=demo_pki.root.issuer)
        store = demo_pki.store(extra=[("short.pem", iss.cert_pem(short))], missing_crl="warn")
        host, _ = demo_pki.host(issuer=iss.Issuer(short, key), days=30)
        result = store.verify_host(host, DEMO_START + dt.timedelta(days=6))
        assert codes(result) == {"ca.expired"}
        assert "Short CA" in result.reasons[0].message and result.reasons[0].fix

    def test_eku_and_keyusage(self, demo_pki: DemoPKI) -> None:
        eu = demo_pki.regions["eu-central"]
        store = demo_pki.store()
        key = iss.make_key()
        server_only = custom_cert("s.example", key, eu.issuer, ca=False,
                                  eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        result = store.verify_host(server_only, demo_pki.at)
        assert codes(result) == {"host.eku"} and "clientAuth" in result.reasons[0].message
        no_eku = custom_cert("n.example", key, eu.issuer, ca=False)
        assert codes(store.verify_host(no_eku, demo_pki.at)) == {"host.eku"}
        no_ku = custom_cert("k.example", key, eu.issuer, ca=False, ku=False, eku=BOTH)
        assert codes(store.verify_host(no_ku, demo_pki.at)) == {"host.keyusage"}
        # Owners need digitalSignature and the documented purpose, emailProtection.
        owners = demo_pki.store(extra=[])
        assert codes(owners.verify_owner(server_only, [], demo_pki.at)) == {"owner.eku"}
        signer = custom_cert("o.example", key, eu.issuer, ca=False,
                             eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
        assert owners.verify_owner(signer, [], demo_pki.at).valid

    def test_key_types_refused(self, demo_pki: DemoPKI) -> None:
        eu = demo_pki.regions["eu-central"]
        store = demo_pki.store()
        dsa_key = dsa.generate_private_key(1024)
        weird = custom_cert("dsa.example", iss.make_key(), eu.issuer, ca=False, eku=BOTH,
                            public_key=dsa_key.public_key())
        assert codes(store.verify_host(weird, demo_pki.at)) == {"key.unsupported"}
        small = rsa.generate_private_key(65537, 1024)
        weak = custom_cert("rsa1024.example", iss.make_key(), eu.issuer, ca=False, eku=BOTH,
                           public_key=small.public_key())
        assert codes(store.verify_host(weak, demo_pki.at)) == {"key.weak"}

    def test_no_issuer_and_wrong_signature(self, demo_pki: DemoPKI) -> None:
        store = demo_pki.store()
        owner, _ = demo_pki.owner()  # issued by the owners' CA, which is not in the hosts' trust dir
        result = store.verify_host(owner, demo_pki.at)
        assert {"chain.no_issuer", "host.eku"} <= codes(result)
        assert [c.name for c in result.chain] == ["Alice Example"]
        eu = demo_pki.regions["eu-central"]
        impostor = iss.Issuer(eu.cert, iss.make_key())  # same CA name, different key
        forged, _ = demo_pki.host(issuer=impostor)
        assert codes(store.verify_host(forged, demo_pki.at)) == {"chain.signature"}

    def test_intermediate_without_root(self, demo_pki: DemoPKI) -> None:
        eu = demo_pki.regions["eu-central"]
        store, problems = demo_pki.build([("eu.pem", iss.cert_pem(eu.cert))], at=demo_pki.at)
        assert [p.reason.code for p in problems] == ["trust.no_root"]
        result = store.verify_host(demo_pki.host()[0], demo_pki.at)
        assert codes(result) == {"chain.no_anchor"}
        assert "Escort Demo Root CA" in result.reasons[0].message

    def test_not_a_ca_path_len_and_keycertsign(self, demo_pki: DemoPKI) -> None:
        root = demo_pki.root
        v = {"start": DEMO_START, "days": 365}
        k1, k2, k3 = iss.make_key(), iss.make_key(), iss.make_key()
        not_ca = custom_cert("Not A CA", k1, root.issuer, ca=False, **v)  # type: ignore[arg-type]
        no_kcs = custom_cert("No KCS CA", k2, root.issuer, ca=True, key_cert_sign=False, **v)  # type: ignore[arg-type]
        # root has pathLen 1: root -> mid -> deep -> leaf puts 2 intermediates below the root
        mid = custom_cert("Mid CA", k3, root.issuer, ca=True, **v)  # type: ignore[arg-type]
        k4 = iss.make_key()
        deep = custom_cert("Deep CA", k4, iss.Issuer(mid, k3), ca=True, **v)  # type: ignore[arg-type]
        extra = [(f"{i}.pem", iss.cert_pem(c)) for i, c in enumerate([not_ca, no_kcs, mid, deep])]
        store, problems = demo_pki.build([*demo_pki.trust_files(), *extra], at=demo_pki.at,
                                         missing_crl="warn")
        assert [p.reason.code for p in problems] == ["trust.not_ca"]
        r1 = store.verify_host(demo_pki.host(issuer=iss.Issuer(not_ca, k1))[0], demo_pki.at)
        assert codes(r1) == {"ca.not_ca", "ca.no_keycertsign"}  # its keyUsage lacks keyCertSign too
        r2 = store.verify_host(demo_pki.host(issuer=iss.Issuer(no_kcs, k2))[0], demo_pki.at)
        assert codes(r2) == {"ca.no_keycertsign"}
        r3 = store.verify_host(demo_pki.host(issuer=iss.Issuer(deep, k4))[0], demo_pki.at)
        assert codes(r3) == {"ca.path_len"} and "Escort Demo Root CA" in r3.reasons[0].message
        assert [c.name for c in r3.chain] == ["h1.example", "Deep CA", "Mid CA", "Escort Demo Root CA"]
        # Path length is also enforced for intermediates given with the leaf.
        store2, _ = demo_pki.build([*demo_pki.trust_files(), extra[2]], at=demo_pki.at, missing_crl="warn")
        r4 = store2.verify_host(demo_pki.host(issuer=iss.Issuer(deep, k4))[0], demo_pki.at,
                                intermediates=[deep])
        assert codes(r4) == {"ca.path_len"}

    def test_name_constraints(self, demo_pki: DemoPKI) -> None:
        key = iss.make_key()
        nc = iss.NameConstraints(permitted_dns=["eu.example"], excluded_ips=["10.66.0.0/16"])
        ca = iss.issue_ca(iss.CASpec(iss.Subject("EU Only CA"), path_len=0, name_constraints=nc), key,
                          iss.Validity.days(365, start=DEMO_START), issuer=demo_pki.root.issuer)
        store, _ = demo_pki.build([*demo_pki.trust_files(), ("nc.pem", iss.cert_pem(ca))],
                                  at=demo_pki.at, missing_crl="warn")
        issuer = iss.Issuer(ca, key)
        good, _ = demo_pki.host("h1.eu.example", issuer=issuer, ips=["10.1.0.1"])
        assert store.verify_host(good, demo_pki.at).valid
        bad_dns, _ = demo_pki.host("h1.us.example", issuer=issuer)
        r = store.verify_host(bad_dns, demo_pki.at)
        assert codes(r) == {"name.constraints"} and "DNS:h1.us.example" in r.reasons[0].message
        bad_ip, _ = demo_pki.host("h2.eu.example", issuer=issuer, ips=["10.66.1.1"])
        r = store.verify_host(bad_ip, demo_pki.at)
        assert codes(r) == {"name.constraints"} and "excluded" in r.reasons[0].message
        # "eu.example" must not match "evileu.example" (label-aligned).
        sneaky, _ = demo_pki.host("evileu.example", issuer=issuer)
        assert codes(store.verify_host(sneaky, demo_pki.at)) == {"name.constraints"}

    def test_name_constraints_bind_intermediates(self, demo_pki: DemoPKI) -> None:
        """A constrained CA's sub-CA with a subject outside the permitted DirName subtree."""
        k0, k1, k2 = iss.make_key(), iss.make_key(), iss.make_key()
        acme = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme")])
        nc = x509.NameConstraints(permitted_subtrees=[x509.DirectoryName(acme)], excluded_subtrees=None)
        v = iss.Validity.days(365, start=DEMO_START)
        root = iss.issue_ca(iss.CASpec(iss.Subject("NC Root")), k0, v)  # no pathLen limit
        top = (x509.CertificateBuilder().subject_name(x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme"),
             x509.NameAttribute(NameOID.COMMON_NAME, "Acme Top")]))
               .issuer_name(root.subject).public_key(k1.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(v.not_before)
               .not_valid_after(v.not_after)
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(nc, critical=True)
               .sign(k0, hashes.SHA256()))
        rogue = custom_cert("Not Acme Sub CA", k2, iss.Issuer(top, k1), ca=True)
        files = [("root.pem", iss.cert_pem(root)), ("top.pem", iss.cert_pem(top)),
                 ("rogue.pem", iss.cert_pem(rogue))]
        store, _ = demo_pki.build(files, at=demo_pki.at, missing_crl="warn")
        node = store.issuer_of(demo_pki.host(issuer=iss.Issuer(rogue, k2))[0])
        assert node is not None
        result = store.check_ca(node, demo_pki.at)
        assert codes(result) == {"name.constraints"}
        assert "Not Acme Sub CA" in result.reasons[0].message

    def test_every_failure_is_reported(self, demo_pki: DemoPKI) -> None:
        """Expired, revoked, wrong EKU and under a revoked CA: all four, not just the first."""
        eu = demo_pki.regions["eu-central"]
        host = custom_cert("bad.example", iss.make_key(), eu.issuer, ca=False,
                           eku=[ExtendedKeyUsageOID.CLIENT_AUTH], days=10)
        crls = [("eu.crl", demo_pki.crl(eu, [host.serial_number])),
                ("root.crl", demo_pki.crl(demo_pki.root, [eu.cert.serial_number]))]
        result = demo_pki.store(crls).verify_host(host, demo_pki.at)
        assert codes(result) == {"cert.expired", "cert.revoked", "host.eku", "ca.revoked"}
        assert not result.valid and all(r.fix for r in result.reasons)
        js = result.as_json()
        assert js["valid"] is False and len(js["reasons"]) == 4  # type: ignore[arg-type]
        assert js["chain"][0].startswith("CN=bad.example")  # type: ignore[index]

    def test_cross_check_agrees_with_our_verdict(self, demo_pki: DemoPKI) -> None:
        """Where cryptography's verifier can judge, it never rejects what we accept and vice versa."""
        store = demo_pki.store()
        cases = [(demo_pki.host(f"h{i}.example", region, days=days)[0], region)
                 for i, (region, days) in enumerate([("eu-central", 365), ("eu-west", 5), ("us-east", 90)])]
        judged = 0
        for at in (demo_pki.at, DEMO_START + dt.timedelta(days=60), DEMO_START - dt.timedelta(days=1)):
            for cert, region in cases:
                theirs = xcheck.judge(cert, [demo_pki.regions[region].cert], demo_pki.root.cert, at)
                if theirs is not None:
                    judged += 1
                    assert store.verify_host(cert, at).valid == theirs
        assert judged == 9

    def test_path_checks_are_cached_per_ca(self, demo_pki: DemoPKI, monkeypatch: pytest.MonkeyPatch) -> None:
        store = demo_pki.store()
        calls: list[str] = []
        real = store._compute_path

        def counting(node: pki.CANode, at: dt.datetime, offset: int) -> object:
            calls.append(node.info.name)
            return real(node, at, offset)

        monkeypatch.setattr(store, "_compute_path", counting)
        certs = [demo_pki.host(f"h{i}.example", ["eu-central", "eu-west"][i % 2])[0] for i in range(20)]
        for cert in certs:
            store.verify_host(cert, demo_pki.at)
        assert sorted(calls) == ["Escort eu-central CA", "Escort eu-west CA"]
        store.verify_host(certs[0], demo_pki.at + dt.timedelta(days=1))
        assert len(calls) == 3  # a new time is a new computation

    def test_concurrent_checks_share_the_caches(self, demo_pki: DemoPKI) -> None:
        """UI and service workers verify from threads, with many different ``at`` values."""
        from concurrent.futures import ThreadPoolExecutor

        store = demo_pki.store()
        certs = [demo_pki.host(f"t{i}.example")[0] for i in range(20)]

        def work(n: int) -> bool:
            return all(store.verify_host(c, demo_pki.at + dt.timedelta(seconds=n * 100 + i)).valid
                       for i, c in enumerate(certs))

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(work, range(16)))
        assert len(store._cache) <= 8

    def test_thousand_host_checks_share_per_ca_work_and_index_crls(
            self, demo_pki: DemoPKI, monkeypatch: pytest.MonkeyPatch) -> None:
        """What keeps 1,000 checks cheap, asserted directly (timing lives in bench/):
        each CA path is computed once per time, and revocation uses the serial index,
        never the CRL's linear scan."""
        regions = list(demo_pki.regions)
        certs = [demo_pki.host(f"h{i}.example", regions[i % 3], ips=[f"10.{i // 250}.0.{i % 250}"])[0]
                 for i in range(1000)]
        crls = [(f"{r}.crl", demo_pki.crl(demo_pki.regions[r], range(50_000, 52_000))) for r in regions]
        store = demo_pki.store(crls)
        computed: list[str] = []
        original = store._compute_path

        def counting(node: Any, at: Any, offset: int) -> Any:
            computed.append(node.info.name)
            return original(node, at, offset)

        def linear_scan(*_args: Any) -> None:
            raise AssertionError("the CRL's linear scan was used on the verification path")

        monkeypatch.setattr(store, "_compute_path", counting)
        monkeypatch.setattr(x509.CertificateRevocationList, "get_revoked_certificate_by_serial_number",
                            linear_scan)
        results = [store.verify_host(c, demo_pki.at) for c in certs]
        assert all(r.valid for r in results)
        assert sorted(set(computed)) == sorted(computed)  # each CA path once for this time
        assert len(computed) <= len(store.nodes())


# --------------------------------------------------------------------------- owners

class TestOwner:
    def test_owner_chain(self, demo_pki: DemoPKI) -> None:
        owners, problems = demo_pki.build(demo_pki.owners_files(), at=demo_pki.at)
        assert problems == []
        cert, _ = demo_pki.owner()
        result = owners.verify_owner(cert, [], demo_pki.at)
        assert result.valid, result.reasons
        assert [c.name for c in result.chain] == ["Alice Example", "Escort Demo Owners CA"]
        host, _ = demo_pki.host()
        assert "chain.no_issuer" in codes(owners.verify_owner(host, [], demo_pki.at))

    def test_x5c_intermediates_fill_gaps(self, demo_pki: DemoPKI) -> None:
        owners, _ = demo_pki.build(demo_pki.owners_files(), at=demo_pki.at)
        key = iss.make_key()
        team = iss.issue_ca(iss.CASpec(iss.Subject("Team CA"), path_len=0), key,
                            iss.Validity.days(365, start=DEMO_START), issuer=demo_pki.owners.issuer)
        cert, _ = demo_pki.owner("Bob", issuer=iss.Issuer(team, key))
        assert codes(owners.verify_owner(cert, [], demo_pki.at)) == {"chain.no_issuer"}
        # The Team CA arrives in x5c: its CRL is looked up in the trust directory too, and
        # without one the owner's revocation status is unknown (fail closed).
        assert codes(owners.verify_owner(cert, [team], demo_pki.at)) == {"revocation.missing"}
        team_crl = ("team.crl", iss.crl_pem(iss.issue_crl(iss.Issuer(team, key), [],
                                                            iss.Validity.days(365, start=DEMO_START))))
        owners, _ = demo_pki.build(demo_pki.owners_files(), [team_crl], at=demo_pki.at)
        result = owners.verify_owner(cert, [team], demo_pki.at)
        assert result.valid, result.reasons
        assert [c.name for c in result.chain] == ["Bob", "Team CA", "Escort Demo Owners CA"]
        assert pki.cert_info(team).fingerprint in result.ca_fingerprints
        # A revoked x5c intermediate is caught through the owners' CA CRL.
        crl = [("o.crl", demo_pki.crl(demo_pki.owners, [team.serial_number]))]
        owners2, _ = demo_pki.build(demo_pki.owners_files(), [*crl, team_crl], at=demo_pki.at)
        assert codes(owners2.verify_owner(cert, [team], demo_pki.at)) == {"ca.revoked"}

    def test_owner_without_digital_signature(self, demo_pki: DemoPKI) -> None:
        owners, _ = demo_pki.build(demo_pki.owners_files(), at=demo_pki.at)
        cert = custom_cert("NoSig", iss.make_key(), demo_pki.owners.issuer, ca=False, ku=False,
                           eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
        assert codes(owners.verify_owner(cert, [], demo_pki.at)) == {"owner.keyusage"}


def test_crl_state_for_the_trust_screen(demo_pki: DemoPKI) -> None:
    """fresh until …, stale, missing and unusable, as CANode.crl_state and the Trust screen say it."""
    from console.ui.text import crl_words

    eu, west, us = (demo_pki.regions[r] for r in ("eu-central", "eu-west", "us-east"))
    forged = iss.crl_pem(iss.issue_crl(iss.Issuer(us.cert, west.key), [],
                                       iss.Validity.days(9, start=DEMO_START)))
    store, _ = TrustStore.build(
        demo_pki.trust_files(),
        [("eu.crl", demo_pki.crl(eu, days=60)), ("west.crl", demo_pki.crl(west, days=7)), ("us.crl", forged)],
        at=demo_pki.at)
    by_name = {n.info.name: n for n in store.nodes()}
    states = {name: n.crl_state(demo_pki.at)[0] for name, n in by_name.items()}
    assert states == {"Escort Demo Root CA": "missing", "Escort eu-central CA": "fresh",
                      "Escort eu-west CA": "stale", "Escort us-east CA": "unusable"}
    label, sentence, tone = crl_words(by_name["Escort eu-central CA"], demo_pki.at)
    assert label == f"CRL fresh until {(DEMO_START + dt.timedelta(days=60)):%Y-%m-%d}" and tone == "dim"
    assert crl_words(by_name["Escort eu-west CA"], demo_pki.at)[0] == "CRL stale"
    label, sentence, tone = crl_words(by_name["Escort us-east CA"], demo_pki.at)
    assert label == "CRL unusable" and "forged" in sentence and tone == "bad"
    assert crl_words(by_name["Escort Demo Root CA"], demo_pki.at)[0] == "CRL missing"


def _delta_crl(ca: iss.Issuer, *, base: int, number: int, revoked: list[int], removed: list[int],
               start: dt.datetime, days: float) -> bytes:
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject).last_update(start)
         .next_update(start + dt.timedelta(days=days))
         .add_extension(x509.CRLNumber(number), critical=False)
         .add_extension(x509.DeltaCRLIndicator(base), critical=True))
    entries = [*((s, None) for s in revoked), *((s, x509.ReasonFlags.remove_from_crl) for s in removed)]
    for serial, reason in entries:
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(start)
        if reason is not None:
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        b = b.add_revoked_certificate(entry.build())
    return iss.crl_pem(b.sign(ca.key, hashes.SHA256()))


def test_delta_crls_are_applied_on_their_base_never_instead_of_it(demo_pki: DemoPKI) -> None:
    eu = demo_pki.regions["eu-central"]
    a, _ = demo_pki.host("a.example")
    b, _ = demo_pki.host("b.example")
    c, _ = demo_pki.host("c.example")
    base = demo_pki.crl(eu, [a.serial_number, c.serial_number], number=5)
    # number 6 on base 5: revokes b, takes c off (removeFromCRL); a stays revoked.
    delta = _delta_crl(eu.issuer, base=5, number=6, revoked=[b.serial_number], removed=[c.serial_number],
                       start=DEMO_START, days=40)
    store, problems = demo_pki.build(demo_pki.trust_files(), [("base.crl", base), ("delta.crl", delta)])
    assert problems == []
    node = next(n for n in store.nodes() if n.info.name == "Escort eu-central CA")
    assert node.crl is not None and node.crl.number == 5 and node.delta is not None
    assert codes(store.verify_host(a, demo_pki.at)) == {"cert.revoked"}
    assert codes(store.verify_host(b, demo_pki.at)) == {"cert.revoked"}
    assert store.verify_host(c, demo_pki.at).valid
    # Once the delta is past its nextUpdate (the base is still current): what it
    # revoked stays revoked, what it took off is revoked again.
    later = DEMO_START + dt.timedelta(days=45)
    assert codes(store.verify_host(b, later)) == {"cert.revoked"}
    assert codes(store.verify_host(c, later)) == {"cert.revoked"}
    # An empty delta with a higher number never replaces the base (the hole in issue 9).
    empty = _delta_crl(eu.issuer, base=5, number=9, revoked=[], removed=[], start=DEMO_START, days=40)
    store, _ = demo_pki.build(demo_pki.trust_files(), [("base.crl", base), ("delta.crl", empty)])
    assert codes(store.verify_host(a, demo_pki.at)) == {"cert.revoked"}
    # A delta for another base, or without any base, is ignored with a warning.
    other = _delta_crl(eu.issuer, base=7, number=8, revoked=[], removed=[a.serial_number],
                       start=DEMO_START, days=40)
    store, problems = demo_pki.build(demo_pki.trust_files(), [("base.crl", base), ("delta.crl", other)])
    assert [(p.reason.code, p.reason.severity) for p in problems] == [("crl.delta_ignored", "warning")]
    assert codes(store.verify_host(a, demo_pki.at)) == {"cert.revoked"}
    store, problems = TrustStore.build(demo_pki.trust_files(), [("delta.crl", other)], at=demo_pki.at)
    assert "crl.delta_ignored" in {p.reason.code for p in problems}
    assert "revocation.missing" in codes(store.verify_host(a, demo_pki.at))
