"""No input crashes escort: every parser turns bad input into its own one-line error.

First the inputs a fuzzer found (each through the real CLI: exit 1 or 2, one line on
stderr, never exit 70), then property-based fuzzing of every parser (hypothesis,
derandomized so CI runs are repeatable). The longer run lives in fuzz/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.adapters import files, fleetfile
from console.cli import main
from console.cli.pki_cmds import parse_time
from console.core import audit, envelope, issuance, strictjson
from console.core import policy as pol
from console.core.errors import InputError
from tests.unit import derkit
from tests.unit.trustkit import FleetFiles, build_fleet

from .conftest import DemoPKI

AT = "2026-01-31T00:00:00Z"


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(r: Result, codes: tuple[int, ...] = (2,)) -> str:
    assert r.exit_code in codes, (r.exit_code, r.output, r.exception)
    err = r.stderr.strip()
    assert err.startswith("escort: ") and "\n" not in err and "Traceback" not in r.output, r.output
    assert "internal error" not in err
    return err


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetFiles:
    return build_fleet(tmp_path_factory.mktemp("fleet"))


# ------------------------------------------------------------------ certificates and CRLs

@pytest.fixture
def trust(tmp_path: Path, demo_pki: DemoPKI) -> Path:
    return demo_pki.write_trust_dir(tmp_path / "trust")


def _bad_certs(demo_pki: DemoPKI) -> dict[str, bytes]:
    leaf = der(demo_pki.host()[0])
    return {"bad-version": derkit.set_version(leaf, 7), "dup-ext": derkit.duplicate_extension(leaf)}


@pytest.mark.parametrize("case", ["bad-version", "dup-ext"])
def test_damaged_certificate_is_one_line(tmp_path: Path, trust: Path, demo_pki: DemoPKI, case: str) -> None:
    bad = tmp_path / "leaf.der"
    bad.write_bytes(_bad_certs(demo_pki)[case])
    err = one_line_error(run("cert", "verify", "--trust", str(trust), "--at", AT, str(bad)))
    assert str(bad) in err


@pytest.mark.parametrize("case", ["bad-version", "dup-ext"])
def test_damaged_certificate_in_trust_dir_is_a_problem(tmp_path: Path, trust: Path, demo_pki: DemoPKI,
                                                        case: str) -> None:
    (trust / "damaged.der").write_bytes(_bad_certs(demo_pki)[case])
    import base64

    pem = (b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(_bad_certs(demo_pki)[case])
           + b"-----END CERTIFICATE-----\n")
    (trust / "damaged.pem").write_bytes(pem)
    store, problems = files.load_trust_store(trust, demo_pki.at)
    bad = {Path(p.source).name: p.reason for p in problems}
    assert set(bad) == {"damaged.der", "damaged.pem"}
    assert all(r.code == "file.invalid" and "\n" not in r.message for r in bad.values())
    # the rest of the directory still works
    assert store.verify_host(demo_pki.host()[0], demo_pki.at).valid
    host = tmp_path / "h.pem"
    host.write_bytes(issuance.cert_pem(demo_pki.host()[0]))
    r = run("cert", "verify", "--trust", str(trust), "--at", AT, "--json", str(host))
    assert r.exit_code == 0, r.output
    names = {Path(p["source"]).name for p in json.loads(r.stdout)["problems"]}
    assert names == {"damaged.der", "damaged.pem"}


def test_crl_with_damaged_issuer_name_is_a_problem(tmp_path: Path, trust: Path, demo_pki: DemoPKI) -> None:
    crl = x509.load_pem_x509_crl(demo_pki.crl(demo_pki.regions["eu-central"]))
    damaged = derkit.damage_crl_issuer(crl.public_bytes(serialization.Encoding.DER))
    with pytest.raises(ValueError):  # the damage is real: cryptography fails on first use
        _ = x509.load_der_x509_crl(damaged).issuer
    (trust / "eu.crl").write_bytes(damaged)
    store, problems = files.load_trust_store(trust, demo_pki.at)
    assert [(Path(p.source).name, p.reason.code) for p in problems] == [("eu.crl", "file.invalid")]
    assert store.verify_host(demo_pki.host()[0], demo_pki.at).valid
    host = tmp_path / "h.pem"
    host.write_bytes(issuance.cert_pem(demo_pki.host()[0]))
    assert run("cert", "verify", "--trust", str(trust), "--at", AT, str(host)).exit_code == 0


# ------------------------------------------------------------------ --at

@pytest.mark.parametrize("at", ["0001-01-01", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59",
                                "9999-12-31T23:59:59-01:00", "1900-01-01", "2026-13-01", "now\0"])
def test_at_at_the_ends_of_the_range(tmp_path: Path, trust: Path, demo_pki: DemoPKI, fleet: FleetFiles,
                                     at: str) -> None:
    host = tmp_path / "h.pem"
    host.write_bytes(issuance.cert_pem(demo_pki.host()[0]))
    assert "--at" in one_line_error(run("cert", "verify", "--trust", str(trust), "--at", at, str(host)))
    assert "--at" in one_line_error(run("explain", "--fleet", str(fleet.fleet), "--offline", "--at", at,
                                        "web-1", "hv-fr-1"))


def test_at_inside_the_range_still_works() -> None:
    assert parse_time("1950-01-01T00:00:00Z").year == 1950
    assert parse_time("9997-12-31T00:00:00Z").year == 9997


# ------------------------------------------------------------------ fleet TOML

_HEAD = 'name = "f"\nkind = "lab"\ntrust_dir = "trust/hosts"\nowners_trust_dir = "trust/owners"\n'
_VM = '[[vms]]\nuuid = "6f1c1e1a-8d7b-4c36-9d61-2a3f6a0b9e11"\nname = "x"\n'

FLEET_CASES = {
    "huge integer": (_HEAD + "stall_timeout_s = " + "9" * 5000 + "\n", "more than 40 digits"),
    "huge integer in range of tomllib": (_HEAD + "stall_timeout_s = " + "9" * 30 + "\n", "at most 86400"),
    "nested arrays": (_HEAD + "grants = " + "[" * 3000 + "]" * 3000 + "\n", "nested deeper"),
    "dotted keys": (_HEAD + "x" + ".x" * 20000 + " = 1\n", "dotted key has more than"),
    "NUL in a path": (_HEAD.replace('"trust/hosts"', '"trust/\\u0000hosts"'), "NUL"),
    "nan timeout": (_HEAD + "stall_timeout_s = nan\n", "stall_timeout_s"),
    "inf timeout": (_HEAD + "stall_timeout_s = inf\n", "stall_timeout_s"),
    "negative timeout": (_HEAD + "stall_timeout_s = -1\n", "stall_timeout_s"),
    "empty VM host": (_HEAD + _VM + 'host = ""\n', "vms[0].host: must not be empty"),
    "non-ASCII digits in an OID": (_HEAD + '[policy_names]\n"x" = "1.\u0663.6"\n', "not a dotted OID"),
    "superscript digits in an OID": (_HEAD + '[policy_names]\n"x" = "1.3\u00b2.6"\n', "not a dotted OID"),
    "huge memory": (_HEAD + _VM + 'host = "h"\nmemory_mib = 99999999999999999\n', "memory_mib"),
    "NUL in a key": (_HEAD + '"a\\u0000b" = 1\n', "unknown key"),
}


@pytest.mark.parametrize("case", sorted(FLEET_CASES))
def test_bad_fleet_file_is_one_line(tmp_path: Path, case: str) -> None:
    text, expect = FLEET_CASES[case]
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    err = one_line_error(run("explain", "--fleet", str(path), "--offline", "x", "y"))
    assert expect in err and len(err) < 400, err
    assert "\0" not in err


def test_dotted_key_file_is_rejected_without_parsing_it(tmp_path: Path) -> None:
    """The 40 KB file that took tomllib over 10 s is refused by the bound before tomllib runs."""
    text = _HEAD + "x" + ".x" * 20000 + " = 1\n"
    assert len(text) > 40_000
    import tomllib
    called = []
    real = tomllib.loads
    try:
        tomllib.loads = lambda *a, **k: called.append(1) or real(*a, **k)  # type: ignore[assignment]
        with pytest.raises(InputError, match="dotted key"):
            fleetfile.parse_fleet(text, "f.toml", tmp_path)
    finally:
        tomllib.loads = real  # type: ignore[assignment]
    assert called == []


def test_fleet_bounds_admit_real_files(fleet: FleetFiles) -> None:
    spec = fleetfile.load_fleet(fleet.fleet)
    assert spec.name and spec.hosts
    text = _HEAD + 'a.b.c = 1\n[policy_names]\n"x" = "1.3.6.1.4.1.55555.1.1"\n'
    with pytest.raises(InputError, match="unknown key"):  # parsed (bounds passed), then the schema spoke
        fleetfile.parse_fleet(text, "f.toml", "/tmp")


# ------------------------------------------------------------------ audit log, JWS, metadata

@pytest.mark.parametrize("line", ['{"kind":"note","seq":NaN}', '{"kind":"note","seq":Infinity}',
                                  '{"kind":"note","x":-Infinity}', '{"kind":"note","x":"\\ud800"}',
                                  '{"kind":"note","kind":"outcome"}', "[" * 100000])
def test_audit_lines_that_used_to_crash(tmp_path: Path, line: str) -> None:
    log = tmp_path / "audit.log"
    good = audit.make_entry({"kind": "note"}, seq=1, ts="2026-01-01T00:00:00Z", prev=audit.GENESIS)[1]
    log.write_text(good + "\n" + line + "\n")
    r = run("audit", "verify", "--json", str(log))
    assert r.exit_code == 1, r.output
    problems = json.loads(r.stdout)["problems"]
    assert (2, "audit.unreadable") in {(p["line"], p["code"]) for p in problems}


def test_nested_jws_header_via_cli(tmp_path: Path) -> None:
    import base64

    header = base64.urlsafe_b64encode(b'{"alg":' + b"[" * 30000 + b"]" * 30000 + b"}").decode().rstrip("=")
    path = tmp_path / "p.jws"
    path.write_text(f"{header}.e30.AAAA\n")
    r = run("policy", "show", str(path))
    one_line_error(r, (1, 2))


# ------------------------------------------------------------------ property-based fuzzing

FUZZ = settings(max_examples=1000, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
SOME = settings(FUZZ, max_examples=300)

_toml_atoms = st.sampled_from([
    "name", "kind", "trust_dir", "[[hosts]]", "[[vms]]", "[policy_names]", "=", " = ", "\n", ".", '"',
    "'", "'''", '"""', "[", "]", "{", "}", ",", "#", "1", "9" * 50, "nan", "inf", "-0", "1e999",
    "true", "\\u0000", "\\", "1979-05-27T07:32:00Z", "x", "\u0663", "_", " ", "\t", "0x1F", "1.5",
])


@FUZZ
@given(st.one_of(st.lists(_toml_atoms, max_size=60).map("".join), st.text(max_size=300)))
def test_fuzz_fleet_toml(text: str) -> None:
    try:
        fleetfile.parse_fleet(_HEAD + text, "f.toml", "/nonexistent")
    except InputError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                              lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                  max_size=3),
                              max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_fuzz_strict_json(data: bytes) -> None:
    try:
        value = strictjson.loads(data)
    except strictjson.StrictJSONError:
        return
    json.dumps(value, allow_nan=False).encode("utf-8")  # whatever it accepts can be written back


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=80), st.sampled_from(['{"seq":NaN}', '{"a":1e999}',
                                                                 '{"a":"\\udfff"}', "{}", "[]"])),
                max_size=6))
def test_fuzz_audit_lines(lines: list[str]) -> None:
    report = audit.verify_chain([line + "\n" for line in lines])
    json.dumps(report.as_json())


_b64 = st.binary(max_size=120).map(lambda b: __import__("base64").urlsafe_b64encode(b).decode().rstrip("="))


@FUZZ
@given(st.one_of(st.text(max_size=200), st.tuples(_b64, _b64, _b64).map(".".join),
                 st.tuples(st.recursive(st.none() | st.integers() | st.text(max_size=6),
                                        lambda c: st.lists(c, max_size=3)
                                        | st.dictionaries(st.sampled_from(["alg", "typ", "x5c", "kid", "z"]),
                                                          c, max_size=4), max_leaves=12),
                           _b64).map(lambda t: __import__("base64").urlsafe_b64encode(
                               json.dumps(t[0]).encode()).decode().rstrip("=") + ".e30." + t[1])))
def test_fuzz_jws(token: str) -> None:
    opened = envelope.open_token(token, envelope.TYP_POLICY, pol.POLICY_FIELDS)
    assert opened.payload is None and opened.reasons
    with contextlib.suppress(InputError):
        envelope.decode_unverified(token)


@FUZZ
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from([
    "<domain>", "</domain>", "<metadata>", "</metadata>", f'<escort:policy xmlns:escort="{pol.POLICY_NS}">',
    "</escort:policy>", "<x/>", "a.b.c", "&amp;", "&x;", "<!DOCTYPE", "<![CDATA[", "]]>", "\ud800", "\0",
    "<?xml version='1.0'?>"]), max_size=12).map("".join)))
def test_fuzz_metadata_xml(xml: str) -> None:
    try:
        pol.token_from_metadata_xml(xml)
    except InputError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.one_of(st.text(max_size=40), st.datetimes().map(lambda d: d.isoformat()),
                 st.tuples(st.datetimes(), st.integers(-1439, 1439)).map(
                     lambda t: t[0].replace(tzinfo=dt.timezone(dt.timedelta(minutes=t[1]))).isoformat())))
def test_fuzz_at(text: str) -> None:
    try:
        value = parse_time(text)
    except InputError:
        return
    assert value.tzinfo is not None
    value + dt.timedelta(days=366)  # date arithmetic around --at (expiry warnings...) cannot overflow
    value - dt.timedelta(days=366)


def _mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """Byte flips, truncations and splices of a good DER object: damage as a fuzzer makes it."""
    n = len(data)
    flip = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=4).map(
        lambda edits: _apply(data, edits))
    cut = st.integers(0, n - 1).map(lambda i: data[:i])
    splice = st.tuples(st.integers(0, n - 1), st.binary(max_size=8)).map(lambda t: data[:t[0]] + t[1]
                                                                         + data[t[0]:])
    return st.one_of(flip, flip, cut, splice)


def _apply(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for i, v in edits:
        b[i] = v
    return bytes(b)


@pytest.fixture(scope="module")
def samples(demo_pki: DemoPKI) -> dict[str, bytes]:
    crl = x509.load_pem_x509_crl(demo_pki.crl(demo_pki.regions["eu-central"], [1234, 5678]))
    return {"cert": der(demo_pki.host(dns=["a.example"], ips=["10.0.0.1"])[0]),
            "ca": der(demo_pki.regions["eu-central"].cert),
            "crl": crl.public_bytes(serialization.Encoding.DER)}


def _pem(kind: str, data: bytes) -> bytes:
    import base64

    label = b"X509 CRL" if kind == "crl" else b"CERTIFICATE"
    return b"-----BEGIN " + label + b"-----\n" + base64.encodebytes(data) + b"-----END " + label + b"-----\n"


def _classify(data: bytes) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    certs, crls, problems = files._classify(data, "f")
    assert len(certs) + len(crls) + len(problems) >= 1
    assert all("\n" not in p.reason.message for p in problems)
    return certs, crls


@pytest.mark.parametrize("kind", ["cert", "ca", "crl"])
def test_fuzz_der(samples: dict[str, bytes], demo_pki: DemoPKI, kind: str) -> None:
    """Damaged DER and PEM: classified (or refused as a problem); a leaf that loads is checked."""
    store = demo_pki.store()

    @settings(FUZZ, max_examples=800)
    @given(_mutations(samples[kind]))
    def check(data: bytes) -> None:
        for blob in (data, _pem(kind, data)):
            certs, _crls = _classify(blob)
            for _source, good in certs:
                for cert in files.pki.load_certificates(good, "f"):
                    store.verify_host(cert, demo_pki.at)

    check()


@pytest.mark.parametrize("kind", ["ca", "crl"])
def test_fuzz_der_in_a_trust_store(samples: dict[str, bytes], demo_pki: DemoPKI, kind: str) -> None:
    """What the directory loader lets through never stops the trust store being built."""
    leaf = demo_pki.host()[0]

    @settings(FUZZ, max_examples=150)
    @given(_mutations(samples[kind]))
    def check(data: bytes) -> None:
        certs, crls = _classify(data)
        store = demo_pki.store(crls=crls, extra=certs)
        assert store.verify_host(leaf, demo_pki.at) is not None

    check()


def test_fuzz_der_is_not_vacuous(samples: dict[str, bytes]) -> None:
    """The mutations reach both outcomes: some damaged inputs still load, most are refused."""
    outcomes: set[bool] = set()

    @settings(SOME, max_examples=200)
    @given(_mutations(samples["cert"]))
    def probe(data: bytes) -> None:
        certs, _crls, _problems = files._classify(data, "f")
        outcomes.add(bool(certs))

    probe()
    assert outcomes == {True, False}
