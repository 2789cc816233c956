"""The shortcuts of a host chain check (issue 12, s1) answer exactly what the long way answers.

* ``checks.SignatureCheck``: a stored CA's side of ``verify_directly_issued_by`` made once
  per CA. It may only ever say "signed" where cryptography's own check says so; every
  certificate below has a VALID signature over bytes that cryptography still refuses
  (inner/outer algorithm mismatch, issuer bytes not the CA's subject bytes...), so dropping
  any of its checks makes a test here fail.
* ``PathBuilder._signature_check``: the per-CA memo holds its node (an entry under another
  node's id, e.g. a re-keyed CA of the same name, is never used).
* issuer names: a certificate's issuer is not parsed at the door when its bytes are a Name
  parsed before (its CA's subject), and the CA is found by those bytes; a damaged issuer
  is still refused at the door, and the index by bytes is the index by name.
* ``attributes.fingerprint_of``: the SHA-256 of the bytes as read equals cryptography's
  fingerprint, for PEM, DER and bundles; an object not loaded by escort gets cryptography's.
* ``CertInfo``'s lazily formatted ``subject``/``issuer``: the same strings, before or after a
  pickle, equal and hash like an eagerly built info.
* ``host_attributes``: SAN names in one pass, policy names per table content.
"""

from __future__ import annotations

import base64
import copy as copy_module
import dataclasses
import datetime as dt
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.adapters.cache import FleetSnapshot
from console.core import pki
from console.core.pki import attributes, checks
from console.core.pki.attributes import der_fields, fields_of
from console.core.pki.checks import SignatureCheck, signed_by

from . import derkit

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
AT = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
SHA256_ALG = bytes.fromhex("300a06082a8648ce3d040302")
SHA384_ALG = bytes.fromhex("300a06082a8648ce3d040303")

Key = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def _name(cn: str, *, utf8: bool = False) -> x509.Name:
    kind = _ASN1Type.UTF8String if utf8 else _ASN1Type.PrintableString
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme", _type=kind),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn, _type=kind)])


def _hash(key: Key) -> hashes.HashAlgorithm | None:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def make_ca(cn: str, key: Key | None = None) -> tuple[x509.Certificate, Key]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = _name(cn)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(START)
            .not_valid_after(START + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, _hash(key)))  # type: ignore[arg-type]
    return cert, key


def make_leaf(ca: x509.Certificate, ca_key: Key, *, cn: str = "h1.example",
              issuer: x509.Name | None = None,
              sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer or ca.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(START).not_valid_after(START + dt.timedelta(days=365))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=True, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.SubjectAlternativeName(sans or [x509.DNSName(cn)]), critical=False))
    return b.sign(ca_key, _hash(ca_key))  # type: ignore[arg-type]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def resign(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, inner: bytes | None = None,
           outer: bytes | None = None, tbs_edit: Callable[[derkit.Node], None] | None = None) -> bytes:
    """``cert`` with its inner/outer AlgorithmIdentifier replaced and/or its TBS edited, and
    its signature made anew by ``key`` (ECDSA SHA-256) over the new TBS: a VALID signature."""
    root = derkit.decode(der(cert))
    tbs = derkit.tbs(root)
    if inner is not None:
        tbs.children[2] = derkit.decode(inner)
    if tbs_edit is not None:
        tbs_edit(tbs)
    if outer is not None:
        root.children[1] = derkit.decode(outer)
    sig = key.sign(derkit.encode(tbs), ec.ECDSA(hashes.SHA256()))
    root.children[2] = derkit.Node(0x03, b"\x00" + sig)
    return derkit.encode(root)


def load(data: bytes) -> x509.Certificate:
    """As escort loads a certificate file (the bytes it read are kept for the shortcuts)."""
    return pki.load_certificate(data, "t.der")


def answers(ca: x509.Certificate, cert: x509.Certificate) -> tuple[bool, bool]:
    """(the shortcut says "signed", cryptography's own check says signed)."""
    fast = SignatureCheck(ca, fields_of(ca)).signed(cert, fields_of(cert))
    return fast, signed_by(cert, ca)


@pytest.fixture(scope="module")
def p256() -> tuple[x509.Certificate, Key]:
    ca, key = make_ca("Acme Issuing CA")
    return load(der(ca)), key


# ----------------------------------------------------------------------------- SignatureCheck

def test_the_shortcut_confirms_a_good_signature(p256: tuple[x509.Certificate, Key]) -> None:
    ca, key = p256
    leaf = load(der(make_leaf(ca, key)))
    assert answers(ca, leaf) == (True, True)


@pytest.mark.parametrize("case", ["inner_alg", "outer_and_inner_sha384", "issuer_utf8", "issuer_other",
                                  "tampered_tbs", "tampered_sig", "other_key"])
def test_the_shortcut_never_says_signed_where_cryptography_does_not(
        p256: tuple[x509.Certificate, Key], case: str) -> None:
    ca, key = p256
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaf = make_leaf(ca, key)
    if case == "inner_alg":  # inner says SHA-384, outer SHA-256; the signature is valid SHA-256
        data = resign(leaf, key, inner=SHA384_ALG)
    elif case == "outer_and_inner_sha384":  # both say SHA-384, the signature is SHA-256 over the TBS
        data = resign(leaf, key, inner=SHA384_ALG, outer=SHA384_ALG)
    elif case == "issuer_utf8":  # the same name as a Python Name, other bytes (UTF8String)
        data = der(make_leaf(ca, key, issuer=_name("Acme Issuing CA", utf8=True)))
    elif case == "issuer_other":  # another issuer name, signed by the CA's key
        data = der(make_leaf(ca, key, issuer=_name("Acme Other CA")))
    elif case == "tampered_tbs":  # the serial's last byte XORed: always another serial (never a no-op)
        root = derkit.decode(der(leaf))
        serial = derkit.tbs(root).children[1]
        serial.value = serial.value[:-1] + bytes([serial.value[-1] ^ 0x01])
        data = derkit.encode(root)
    elif case == "tampered_sig":  # one byte inside the signature's s XORed: the TBS is untouched
        raw = bytearray(der(leaf))
        raw[-5] ^= 0x01
        data = bytes(raw)
    else:
        other = ec.generate_private_key(ec.SECP256R1())
        data = der(make_leaf(ca, other))
    # Every case really changed something (a tamper that happens to write the byte that was
    # there already would test the untouched certificate and fail now and then).
    original, tampered = derkit.decode(der(leaf)), derkit.decode(data)
    assert data != der(leaf)
    if case == "tampered_tbs":
        assert derkit.encode(derkit.tbs(tampered)) != derkit.encode(derkit.tbs(original))
        assert tampered.children[2] == original.children[2]  # the same signature, over other bytes
    elif case == "tampered_sig":
        assert derkit.tbs(tampered) == derkit.tbs(original)
        assert tampered.children[2] != original.children[2]
    cert = x509.load_der_x509_certificate(data)
    attributes.facts(cert).der = data  # as load_certificates files it
    fast, slow = answers(ca, cert)
    assert slow is False
    assert fast is False


@pytest.mark.parametrize("kind", ["ed25519", "rsa", "p384"])
def test_other_keys_are_left_to_cryptography_or_confirmed_the_same(kind: str) -> None:
    key: Key = (ed25519.Ed25519PrivateKey.generate() if kind == "ed25519"
                else rsa.generate_private_key(65537, 2048) if kind == "rsa"
                else ec.generate_private_key(ec.SECP384R1()))
    ca_raw, _ = make_ca(f"Acme {kind} CA", key)
    ca = load(der(ca_raw))
    leaf = load(der(make_leaf(ca, key)))
    fast, slow = answers(ca, leaf)
    assert slow is True
    assert fast is (kind == "p384")  # only ECDSA is taken by the shortcut


def test_der_fields_are_the_elements_as_written(p256: tuple[x509.Certificate, Key]) -> None:
    ca, key = p256
    leaf = make_leaf(ca, key)
    fields = der_fields(der(leaf))
    assert fields is not None
    outer, inner, issuer, subject = fields
    assert outer == inner == SHA256_ALG
    assert issuer == leaf.issuer.public_bytes() and subject == leaf.subject.public_bytes()
    assert der_fields(der(leaf) + b"\x00") is None and der_fields(der(leaf)[:-1]) is None
    assert der_fields(b"") is None and der_fields(b"\x30\x03\x02\x01\x01") is None


def test_the_store_answers_the_same_with_and_without_the_shortcut(
        p256: tuple[x509.Certificate, Key], monkeypatch: pytest.MonkeyPatch) -> None:
    ca, key = p256
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    leaves = [make_leaf(ca, key), make_leaf(ca, key, issuer=_name("Acme Issuing CA", utf8=True))]
    datas = [der(c) for c in leaves] + [resign(leaves[0], key, inner=SHA384_ALG)]

    def results() -> list[tuple[bool, tuple[str, ...]]]:
        store, _ = pki.TrustStore.build([("ca.pem", der(ca))], at=AT, missing_crl="warn")
        out = []
        for data in datas:
            try:
                cert = load(data)
            except pki.InputError:
                cert = x509.load_der_x509_certificate(data)
            r = store.verify_host(cert, AT)
            out.append((r.valid, tuple(x.code for x in r.reasons)))
        return out

    with_shortcut = results()
    calls: list[bool] = []
    real = SignatureCheck.signed

    def never(self: SignatureCheck, cert: x509.Certificate, data: bytes | None) -> bool:
        calls.append(True)
        return False

    monkeypatch.setattr(SignatureCheck, "signed", never)
    without = results()
    monkeypatch.setattr(SignatureCheck, "signed", real)
    assert calls and with_shortcut == without
    assert with_shortcut[0] == (True, ())
    assert "chain.signature" in with_shortcut[1][1] and "chain.signature" in with_shortcut[2][1]


def test_a_ca_entry_under_another_nodes_id_is_never_used() -> None:
    key1 = ec.generate_private_key(ec.SECP256R1())
    key2 = ec.generate_private_key(ec.SECP256R1())
    ca1 = load(der(make_ca("Acme Issuing CA", key1)[0]))
    ca2 = load(der(make_ca("Acme Issuing CA", key2)[0]))  # re-keyed: same name, another key
    store, _ = pki.TrustStore.build([("1.pem", der(ca1)), ("2.pem", der(ca2))], at=AT, missing_crl="warn")
    n1 = next(n for n in store.nodes() if n.info.cert == ca1)
    n2 = next(n for n in store.nodes() if n.info.cert == ca2)
    leaf = load(der(make_leaf(ca1, key1)))
    info = pki.cert_info(leaf)
    # what an id() reused by another node would look like: CA 1's prepared side filed under CA 2
    store._sig_checks[id(n2)] = store._sig_checks[id(n1)]
    assert store._signed_by_node(leaf, info, n2) is False
    assert store._signed_by_node(leaf, info, n1) is True
    assert store._sig_checks[id(n2)][0] is n2


# ----------------------------------------------------------------------------- issuer names

def _damage_issuer(data: bytes) -> bytes:
    """The certificate with the value of its issuer's last attribute made a UTF8String of
    bytes that are not UTF-8 (it loads; cryptography cannot turn the issuer into a Name)."""
    root = derkit.decode(data)
    issuer = derkit.tbs(root).children[3]
    value = issuer.children[-1].children[0].children[1]
    value.tag, value.value = 0x0C, b"\xff\xfe"
    return derkit.encode(root)


def test_a_damaged_issuer_is_refused_at_the_door_whatever_was_parsed_before(
        p256: tuple[x509.Certificate, Key]) -> None:
    ca, key = p256
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    good = make_leaf(ca, key)
    load(der(good))  # the CA's subject (this leaf's issuer) is now a name known to parse
    fields = fields_of(ca)
    assert fields is not None and attributes.name_parses(fields[3])
    bad = resign(good, key, tbs_edit=lambda t: None)  # (re-signed: only the issuer differs below)
    root = derkit.decode(_damage_issuer(bad))
    sig = key.sign(derkit.encode(derkit.tbs(root)), ec.ECDSA(hashes.SHA256()))
    root.children[2] = derkit.Node(0x03, b"\x00" + sig)
    damaged = derkit.encode(root)
    with pytest.raises(ValueError):
        _ = x509.load_der_x509_certificate(damaged).issuer
    pem = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(damaged) + b"-----END CERTIFICATE-----\n"
    for data in (damaged, pem):
        with pytest.raises(pki.InputError, match="damaged certificate"):
            pki.load_certificates(data, "bad.pem")
    bad_fields = der_fields(damaged)
    assert bad_fields is not None and not attributes.name_parses(bad_fields[2])


def test_the_issuer_of_a_known_ca_is_found_by_its_bytes_and_never_parsed(
        p256: tuple[x509.Certificate, Key]) -> None:
    ca, key = p256
    store, _ = pki.TrustStore.build([("ca.pem", der(ca))], at=AT, missing_crl="warn")
    leaf = load(der(make_leaf(ca, key)))
    assert store.verify_host(leaf, AT).valid
    # (and the CertInfo formats no issuer string: nobody read it)
    assert "issuer" not in pki.cert_info(leaf).__dict__


def test_the_index_by_bytes_is_the_index_by_name() -> None:
    key1, key2 = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    printable = load(der(make_ca("Acme Issuing CA", key1)[0]))
    name = _name("Acme Issuing CA", utf8=True)  # the same name as cryptography compares names
    utf8 = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key2.public_key())
            .serial_number(5).not_valid_before(START).not_valid_after(START + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key2, hashes.SHA256()))
    utf8 = load(der(utf8))
    assert printable.subject == utf8.subject and der(printable) != der(utf8)
    store, _ = pki.TrustStore.build([("1.pem", der(printable)), ("2.pem", der(utf8))], at=AT,
                                    missing_crl="warn")
    group = store._by_subject[printable.subject]
    assert len(group) == 2
    for cert in (printable, utf8):
        fields = fields_of(cert)
        assert fields is not None and store._by_subject_der[fields[3]] is group
    # a leaf under each: the same answers with the index by bytes emptied (by name only)
    leaves = [load(der(make_leaf(printable, key1))), load(der(make_leaf(utf8, key2)))]

    def results() -> list[tuple[bool, list[str], frozenset[str]]]:
        return [(r.valid, [x.code for x in r.reasons], r.ca_fingerprints)
                for r in (store.verify_host(c, AT) for c in leaves)]

    with_index = results()
    store._by_subject_der = {}
    store._signatures.clear()
    by_name = results()
    assert with_index == by_name and with_index[0][0] and with_index[1][0], with_index


# ----------------------------------------------------------------------------- canonical PEM

def reference_load(data: bytes, source: str) -> list[x509.Certificate]:
    """``load_certificates``' PEM branch as it was: every block through cryptography's PEM reader."""
    from console.core.pki.pem import _check_extensions, pem_blocks

    certs = []
    for kind, label, block in pem_blocks(data, source):
        if kind != "certificate":
            continue
        try:
            cert = x509.load_pem_x509_certificate(block)
        except (ValueError, x509.InvalidVersion) as exc:
            raise pki.InputError(f"{source}: malformed PEM ({label} block is not a valid "
                                 f"X.509 certificate: {exc})") from exc
        _check_extensions(cert, source)
        certs.append(cert)
    return certs


def _outcome(fn: Callable[[bytes, str], list[x509.Certificate]], data: bytes) -> tuple[str, object]:
    try:
        return "certs", [der(c) for c in fn(data, "f.pem")]
    except pki.InputError as exc:
        return "refused", str(exc)


_GOOD: list[bytes] = []


def _good_ders() -> list[bytes]:
    if not _GOOD:
        ca, key = make_ca("Acme PEM CA")
        _GOOD.extend([der(ca), der(make_leaf(ca, key)), der(make_leaf(ca, key, cn="b.example"))])
    return _GOOD


_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _wrap(body: bytes, style: int) -> bytes:
    text = base64.b64encode(body)
    if style == 4 and text.endswith(b"="):  # non-zero unused bits in the last character: Python's
        last = text.rstrip(b"=")            # base64 decoder takes it, the PEM reader's refuses it
        i = len(last) - 1
        text = last[:i] + bytes([_B64[_B64.index(last[i]) | 1]]) + text[len(last):]
    width, nl = [(64, b"\n"), (76, b"\n"), (64, b"\r\n"), (64, b"\n"), (64, b"\n")][style]
    lines = nl.join(text[i:i + width] for i in range(0, len(text), width))
    label = b"X509 CERTIFICATE" if style == 3 else b"CERTIFICATE"
    return b"-----BEGIN " + label + b"-----" + nl + lines + nl + b"-----END " + label + b"-----" + nl


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
       st.integers(0, 4), st.integers(-3, 0))
def test_canonical_blocks_load_as_the_pem_reader_loads_them(which: int, flips: list[tuple[int, int]],
                                                            style: int, cut: int) -> None:
    body = bytearray(_good_ders()[which])
    for pos, value in flips:  # damage anywhere: a name, an extension, a length, the signature...
        body[pos % len(body)] = value
    data = _wrap(bytes(body[:len(body) + cut] if cut else body), style)
    assert _outcome(pki.load_certificates, data) == _outcome(reference_load, data)


# ----------------------------------------------------------------------------- fingerprints

def test_fingerprints_of_the_bytes_read_equal_cryptographys(p256: tuple[x509.Certificate, Key]) -> None:
    ca, key = p256
    a, b = make_leaf(ca, key, cn="a.example"), make_leaf(ca, key, cn="b.example")
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (a, b))
    bundle = pki.load_certificates(b"text before\n" + pem, "bundle.pem")
    alone = pki.load_certificates(der(a), "a.der")
    for got, want in ((bundle[0], a), (bundle[1], b), (alone[0], a)):
        assert attributes.facts(got).der == der(want)
        assert pki.cert_info(got).fingerprint == want.fingerprint(hashes.SHA256()).hex()
    outside = x509.load_der_x509_certificate(der(b))  # not read by escort: nothing filed
    assert attributes.facts(outside).der is None
    assert attributes.fingerprint_of(outside) == b.fingerprint(hashes.SHA256()).hex()
    # an entry filed under another object's id is not this object's
    attributes._FACTS[id(outside)] = attributes.facts(bundle[0])
    assert attributes.fingerprint_of(outside) == b.fingerprint(hashes.SHA256()).hex()


# ----------------------------------------------------------------------------- lazy CertInfo

def test_subject_and_issuer_are_formatted_when_read(p256: tuple[x509.Certificate, Key]) -> None:
    ca, key = p256
    leaf = load(der(make_leaf(ca, key)))
    info = pki.cert_info(leaf, "h1.pem")
    assert "subject" not in info.__dict__ and "issuer" not in info.__dict__
    copy = FleetSnapshot.loads(FleetSnapshot.dumps(info))  # as the console gets it from the helper
    assert isinstance(copy, pki.CertInfo) and "subject" not in copy.__dict__
    shallow = copy_module.copy(info)  # (a copy of the half-filled instance: lazy too)
    replaced = dataclasses.replace(info, source="other.pem")
    for i in (info, copy, shallow, replaced):
        assert i.subject == leaf.subject.rfc4514_string() == "CN=h1.example,O=Acme"
        assert i.issuer == leaf.issuer.rfc4514_string() == "CN=Acme Issuing CA,O=Acme"
    eager = pki.CertInfo(**{f.name: getattr(info, f.name) for f in dataclasses.fields(pki.CertInfo)})
    fresh = pki.cert_info(leaf, "h1.pem")
    assert eager == fresh and hash(eager) == hash(fresh) and repr(eager) == repr(fresh)
    with pytest.raises(AttributeError):
        _ = info.no_such_field  # type: ignore[attr-defined]


def test_a_certificate_without_common_name_is_named_by_its_subject(
        p256: tuple[x509.Certificate, Key]) -> None:
    ca, key = p256
    other = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NoCN")]))
            .issuer_name(ca.subject).public_key(other.public_key()).serial_number(7)
            .not_valid_before(START).not_valid_after(START + dt.timedelta(days=2))
            .sign(key, hashes.SHA256()))
    info = pki.cert_info(load(der(cert)))
    assert info.name == info.subject == "O=NoCN"


def reference_cert_info(cert: x509.Certificate, source: str = "") -> pki.CertInfo:
    """``cert_info`` as it was before the lazy fields (verbatim but for the imports)."""
    from console.core.pki.attributes import (
        _EKU_NAMES,
        _KU_BITS,
        _KU_NAMES,
        aki_of,
        basic_constraints,
        email_of,
        ext,
        ext_key_usage,
        key_type,
        key_usage,
        name_constraints_of,
        nc_summary,
        ski_of,
        subject_first,
    )

    basic = basic_constraints(cert)
    ku = key_usage(cert)
    eku = ext_key_usage(cert)
    nc = name_constraints_of(cert)
    pol = ext(cert, x509.CertificatePolicies)
    ski, aki = ski_of(cert), aki_of(cert)
    email = email_of(cert)
    subject = cert.subject.rfc4514_string()
    is_ca = bool(basic and basic.ca)
    path_len = basic.path_length if basic and basic.ca else None
    ku_names: tuple[str, ...] = ()
    if ku is not None:
        ku_names = tuple(n for bit, n in zip(_KU_BITS, _KU_NAMES, strict=True) if getattr(ku, bit))
    constraints = "not a CA" if not is_ca else ("CA" if path_len is None else f"CA, pathLen {path_len}")
    return pki.CertInfo(
        cert=cert, name=subject_first(cert, NameOID.COMMON_NAME) or subject, subject=subject,
        issuer=cert.issuer.rfc4514_string(), serial=cert.serial_number,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, is_ca=is_ca, path_len=path_len, key_type=key_type(cert),
        policies=tuple(p.policy_identifier.dotted_string for p in pol)
        if isinstance(pol, x509.CertificatePolicies) else (),
        name_constraints=nc_summary(nc), source=source, ski=ski.hex() if ski else "",
        aki=aki.hex() if aki else "", key_usage=ku_names,
        ext_key_usage=tuple(_EKU_NAMES.get(o, o.dotted_string) for o in eku) if eku else (),
        constraints=constraints, email=email)


def test_every_field_is_what_the_eager_cert_info_made(demo_pki: object) -> None:
    import ipaddress

    from console.core.pki.model import LAZY_FIELDS

    demo = demo_pki
    certs = [demo.host()[0], demo.host(ips=["192.0.2.9"], dns=["x.example"])[0],  # type: ignore[attr-defined]
             demo.owner()[0], demo.owner(email=None)[0],  # type: ignore[attr-defined]
             demo.root.cert, demo.owners.cert, *(ca.cert for ca in demo.regions.values())]  # type: ignore[attr-defined]
    key = ec.generate_private_key(ec.SECP256R1())
    no_cn = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NC")])
    nc = (x509.CertificateBuilder().subject_name(no_cn)
          .issuer_name(_name("x")).public_key(key.public_key()).serial_number(11)
          .not_valid_before(START).not_valid_after(START + dt.timedelta(days=9))
          .add_extension(x509.BasicConstraints(ca=True, path_length=2), critical=True)
          .add_extension(x509.NameConstraints(
              permitted_subtrees=[x509.DNSName("example.net"),
                                  x509.IPAddress(ipaddress.ip_network("192.0.2.0/24"))],
              excluded_subtrees=[x509.RFC822Name("bad.example.net")]), critical=True)
          .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("ca@example.net")]), critical=False)
          .sign(key, hashes.SHA256()))
    certs.append(nc)
    assert all(f not in pki.CertInfo.__dict__ for f in LAZY_FIELDS)  # no default to fall back on
    for cert in certs:
        for loaded in (cert, load(der(cert))):
            info = pki.cert_info(loaded, "src.pem")
            assert not LAZY_FIELDS & set(info.__dict__) - {"subject"}  # (subject: only without a CN)
            want = reference_cert_info(loaded, "src.pem")
            for f in dataclasses.fields(pki.CertInfo):
                assert getattr(info, f.name) == getattr(want, f.name), f.name
            assert info == want and hash(info) == hash(want)
            copy = FleetSnapshot.loads(FleetSnapshot.dumps(pki.cert_info(loaded, "src.pem")))
            assert copy == want


# ----------------------------------------------------------------------------- host attributes

def test_host_names_in_one_pass_are_those_of_each_type(p256: tuple[x509.Certificate, Key]) -> None:
    import ipaddress

    ca, key = p256
    sans: list[x509.GeneralName] = [
        x509.DNSName("a.example"), x509.IPAddress(ipaddress.ip_address("192.0.2.1")),
        x509.RFC822Name("ops@example.net"), x509.DNSName("b.example"),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1"))]
    leaf = load(der(make_leaf(ca, key, sans=sans)))
    attrs = pki.host_attributes(leaf)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert attrs.dns_names == tuple(san.get_values_for_type(x509.DNSName)) == ("a.example", "b.example")
    assert attrs.ips == tuple(str(i) for i in san.get_values_for_type(x509.IPAddress))
    assert (attrs.common_name, attrs.organization, attrs.country) == ("h1.example", "Acme", None)


def test_policy_names_follow_each_table(p256: tuple[x509.Certificate, Key]) -> None:
    ca, key = p256
    gold, silver = "1.3.6.1.4.1.99999.1", "1.3.6.1.4.1.99999.2"
    cert = (x509.CertificateBuilder().subject_name(_name("p.example")).issuer_name(ca.subject)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key()).serial_number(9)
            .not_valid_before(START).not_valid_after(START + dt.timedelta(days=2))
            .add_extension(x509.CertificatePolicies(
                [x509.PolicyInformation(x509.ObjectIdentifier(gold), None)]), critical=False)
            .sign(key, hashes.SHA256()))
    leaf = load(der(cert))
    table = {"gold": gold}
    assert pki.host_attributes(leaf, table).policies == frozenset({"gold"})
    assert pki.host_attributes(leaf, {"tier-1": gold}).policies == frozenset({"tier-1"})
    table["gold"] = silver  # the same dict object, changed: its content counts, not its identity
    assert pki.host_attributes(leaf, table).policies == frozenset({gold})
    assert pki.host_attributes(leaf).policies == frozenset({gold})
    assert pki.host_attributes(leaf, {}).policies == frozenset({gold})
    assert checks is not None
