"""adapters.files.load_trust_dir / load_trust_store: content-based, bounded, non-recursive."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from console.adapters import files
from console.core import issuance as iss
from console.core.errors import InputError

from .conftest import DemoPKI


def test_classifies_by_content_not_name(tmp_path: Path, demo_pki: DemoPKI) -> None:
    d = tmp_path / "trust"
    d.mkdir()
    (d / "root.crl").write_bytes(iss.cert_pem(demo_pki.root.cert))  # a certificate named .crl
    (d / "eu.der").write_bytes(demo_pki.regions["eu-central"].cert.public_bytes(serialization.Encoding.DER))
    (d / "revoked.pem").write_bytes(demo_pki.crl(demo_pki.root))  # a CRL named .pem
    bundle = iss.cert_pem(demo_pki.regions["eu-west"].cert) + iss.cert_pem(demo_pki.regions["us-east"].cert)
    (d / "bundle.pem").write_bytes(bundle)
    crl_der = demo_pki.crl(demo_pki.regions["eu-west"])
    from cryptography import x509
    (d / "west.bin").write_bytes(x509.load_pem_x509_crl(crl_der).public_bytes(serialization.Encoding.DER))
    certs, crls, problems = files.load_trust_dir(d)
    assert sorted(Path(s).name for s, _ in certs) == ["bundle.pem[1]", "bundle.pem[2]", "eu.der", "root.crl"]
    assert sorted(Path(s).name for s, _ in crls) == ["revoked.pem", "west.bin"]
    assert problems == []
    store, more = files.load_trust_store(d, demo_pki.at)
    assert more == [] and len(store.nodes()) == 4 and len(store.crls) == 2
    # eu-west and the root publish CRLs here (as DER and under a .pem name): valid.
    assert store.verify_host(demo_pki.host(region="eu-west")[0], demo_pki.at).valid
    # us-east publishes none: its hosts' revocation status is unknown (fail closed).
    us = store.verify_host(demo_pki.host(region="us-east")[0], demo_pki.at)
    assert [r.code for r in us.reasons] == ["revocation.missing"]


def test_bad_files_become_problems(tmp_path: Path, demo_pki: DemoPKI) -> None:
    d = demo_pki.write_trust_dir(tmp_path / "trust")
    (d / "host.key").write_bytes(iss.key_pem(demo_pki.root.key))
    (d / "huge.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * (1024 * 1024 + 10))
    (d / "broken.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    (d / "README").write_text("certificates live here\n")
    (d / "empty.pem").write_bytes(b"")
    (d / ".hidden.pem").write_bytes(b"junk")
    (d / "sub").mkdir()
    (d / "sub" / "junk.pem").write_bytes(b"junk")
    certs, _crls, problems = files.load_trust_dir(d)
    assert len(certs) == 4
    got = {Path(p.source).name: p.reason for p in problems}
    assert set(got) == {"host.key", "huge.pem", "broken.pem", "README", "empty.pem"}
    assert got["host.key"].code == "file.private_key"
    assert got["huge.pem"].code == "file.invalid" and "larger than 1024 KiB" in got["huge.pem"].message
    assert got["broken.pem"].code == "file.invalid" and "malformed PEM" in got["broken.pem"].message
    assert got["README"].code == "file.invalid"
    assert got["empty.pem"].severity == "warning"
    assert all("\n" not in r.message for r in got.values())


def test_empty_or_missing_directory(tmp_path: Path, demo_pki: DemoPKI) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"no CA certificates in {empty}$"):
        files.load_trust_dir(empty)
    (empty / "revoked.crl").write_bytes(demo_pki.crl(demo_pki.root))
    with pytest.raises(InputError, match="no CA certificates in"):
        files.load_trust_dir(empty)
    with pytest.raises(InputError, match="no such trust directory"):
        files.load_trust_dir(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        files.load_trust_dir(tmp_path / "file")


def test_only_host_certificates_is_unusable(tmp_path: Path, demo_pki: DemoPKI) -> None:
    d = tmp_path / "t"
    d.mkdir()
    (d / "h.pem").write_bytes(iss.cert_pem(demo_pki.host()[0]))
    with pytest.raises(InputError, match="no CA certificates"):
        files.load_trust_store(d, demo_pki.at)
