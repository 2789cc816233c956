"""The per-certificate memo of what a certificate says (``pki.attributes.facts``).

Certificates are made with the ``openssl`` CLI. Two certificates with the same subject,
issuer and serial but different extensions must each get their own answers, whatever
order they are asked in, with the memo full or emptied, and even when a memo entry
sits under the id() of another object; damaged certificates are refused exactly as
before, every time they are asked about (nothing is remembered for them).
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from console.core import issuance as iss
from console.core import pki
from console.core.errors import InputError
from console.core.pki import attributes

from . import derkit, ossl

HIGH = iss.DEFAULT_POLICY_NAMES["assurance:high"]
MEDIUM = iss.DEFAULT_POLICY_NAMES["assurance:medium"]


class Twins:
    def __init__(self, d: Path) -> None:
        if shutil.which("openssl") is None:  # pragma: no cover - openssl is a dev dependency (deps/)
            pytest.fail("openssl CLI missing")
        tree = ossl.Tree(d)
        root = tree.root("root", "/O=Acme/CN=Acme Root CA")
        inter = tree.ca(root, "int", "/O=Acme/CN=Acme Issuing CA",
                        ext=[f"certificatePolicies={HIGH},{MEDIUM}"])
        tree.crl(root, "root.crl")
        tree.crl(inter, "int.crl")
        serial = tree._serial
        # same subject, same issuer, same serial; everything else differs
        self.good = tree.host(inter, "twin.acme.example", policies=HIGH,
                              san="DNS:twin.acme.example,IP:192.0.2.7")
        tree._serial = serial
        self.bad = tree.issue(inter, "twin-b", "/C=DE/L=Frankfurt/O=Acme/CN=twin.acme.example", [
            "basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign",
            "subjectAltName=DNS:other.acme.example", "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid", f"certificatePolicies={MEDIUM}"])
        self.trust = [(str(p), p.read_bytes()) for p in (root.pem, inter.pem)]
        self.crls = [(str(d / n), (d / n).read_bytes()) for n in ("root.crl", "int.crl")]

    def store(self) -> pki.TrustStore:
        return pki.TrustStore.build(self.trust, self.crls, at=dt.datetime.now(dt.UTC))[0]

    def load(self, which: str) -> x509.Certificate:
        path = self.good if which == "good" else self.bad
        return pki.load_certificate(path.read_bytes(), str(path))


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Twins:
    return Twins(tmp_path_factory.mktemp("twins"))


def answers(store: pki.TrustStore, cert: x509.Certificate) -> tuple[Any, ...]:
    at = dt.datetime.now(dt.UTC)
    chain = store.verify_host(cert, at)
    info = pki.cert_info(cert)
    attrs = pki.host_attributes(cert)
    return (chain.valid, tuple(r.code for r in chain.reasons), chain.policies, info.is_ca,
            info.key_usage, info.ext_key_usage, info.policies, info.constraints, attrs.dns_names,
            attrs.ips, attrs.policies, attrs.common_name, attrs.country)


def expected_good(a: tuple[Any, ...]) -> None:
    assert a[0] is True and a[1] == ()
    assert a[3] is False and "digitalSignature" in a[4] and a[5] == ("serverAuth", "clientAuth")
    assert a[8] == ("twin.acme.example",) and a[9] == ("192.0.2.7",)
    assert a[10] == frozenset({"assurance:high"}) and a[11] == "twin.acme.example" and a[12] == "DE"


def expected_bad(a: tuple[Any, ...]) -> None:
    assert a[0] is False and {"host.is_ca", "host.keyusage", "host.eku"} <= set(a[1])
    assert a[3] is True and a[4] == ("keyCertSign",) and a[5] == ()
    assert a[8] == ("other.acme.example",) and a[9] == ()
    assert a[10] == frozenset({"assurance:medium"}) and a[11] == "twin.acme.example"


def test_twins_really_share_subject_issuer_and_serial(twins: Twins) -> None:
    good, bad = twins.load("good"), twins.load("bad")
    assert (good.subject, good.issuer, good.serial_number) == (bad.subject, bad.issuer, bad.serial_number)
    assert good != bad


def test_each_twin_gets_its_own_answers_in_any_order(twins: Twins) -> None:
    store = twins.store()
    good, bad = twins.load("good"), twins.load("bad")
    for _ in range(2):  # asked again: from the memo now
        expected_good(answers(store, good))
        expected_bad(answers(store, bad))
    bad2, good2 = twins.load("bad"), twins.load("good")  # the same bytes as new objects
    expected_bad(answers(store, bad2))
    expected_good(answers(store, good2))


def test_an_entry_under_another_objects_id_is_never_used(twins: Twins) -> None:
    store = twins.store()
    good, bad = twins.load("good"), twins.load("bad")
    expected_good(answers(store, good))
    # what an id() reused by another object would look like: the good twin's filled
    # entry filed under the bad twin's id
    attributes._FACTS[id(bad)] = attributes.facts(good)
    expected_bad(answers(store, bad))
    assert attributes.facts(bad).cert is bad


def test_a_full_memo_is_emptied_and_answers_stay_right(twins: Twins, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attributes, "_FACTS_MAX", 1)
    store = twins.store()
    certs = [twins.load("good" if i % 2 == 0 else "bad") for i in range(6)]
    for _ in range(2):
        for i, cert in enumerate(certs):
            (expected_good if i % 2 == 0 else expected_bad)(answers(store, cert))
    assert len(attributes._FACTS) <= 1


def test_damaged_certificates_are_refused_the_same_way_every_time(twins: Twins) -> None:
    der = twins.load("good").public_bytes(serialization.Encoding.DER)
    for damaged in (derkit.duplicate_extension(der), derkit.set_version(der, 7)):
        with pytest.raises(InputError) as first:
            pki.load_certificates(damaged, "leaf.der")
        with pytest.raises(InputError) as second:
            pki.load_certificates(damaged, "leaf.der")
        assert str(first.value) == str(second.value) and "leaf.der" in str(first.value)
    # past the door (a certificate object from elsewhere): the checks raise what they
    # raised before, on every call, and the memo keeps nothing for it
    cert = x509.load_der_x509_certificate(derkit.duplicate_extension(der))
    store = twins.store()
    raised = []
    for _ in range(2):
        with pytest.raises(x509.DuplicateExtension) as exc:
            store.verify_host(cert, dt.datetime.now(dt.UTC))
        raised.append(str(exc.value))
        with pytest.raises(x509.DuplicateExtension):
            pki.host_attributes(cert)
    assert raised[0] == raised[1]
    assert attributes.facts(cert).exts is None
