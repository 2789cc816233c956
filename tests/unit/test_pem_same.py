"""``pki.pem_blocks`` finds exactly the blocks its earlier, slower form found.

The block pattern skips a body a run of non-dashes at a time instead of trying the END
line at every byte, and whitespace is dropped with ``bytes.translate``. Property: for
inputs built from BEGIN/END lines (matching, mismatched, lowercase, unterminated),
base64 text, stray dashes, whitespace and RFC 1421 headers, it returns the same
blocks or refuses with the same sentence as ``reference`` (the function as it was,
kept here verbatim), and real certificate files still load.
"""

from __future__ import annotations

import binascii
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from console.core.errors import InputError
from console.core.pki import pem
from console.core.pki.pem import PemKind, _label_kind

_OLD_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)-----END ([A-Z0-9 ]+)-----", re.S)
_OLD_BEGIN = re.compile(rb"-----BEGIN ")


def reference(data: bytes, source: str) -> list[tuple[PemKind, str, bytes]]:
    if not _OLD_BEGIN.search(data):
        return []
    blocks: list[tuple[PemKind, str, bytes]] = []
    for m in _OLD_BLOCK.finditer(data):
        begin, end = m.group(1).decode(), m.group(3).decode()
        if begin != end:
            raise InputError(f"{source}: malformed PEM (BEGIN {begin} closed by END {end})")
        body = re.sub(rb"\s+", b"", m.group(2))
        if b":" in m.group(2):
            kind = _label_kind(begin)
            blocks.append((kind, begin, m.group(0)))
            continue
        try:
            binascii.a2b_base64(body, strict_mode=True)
        except (binascii.Error, ValueError) as exc:
            raise InputError(f"{source}: malformed PEM ({begin} block is not valid base64)") from exc
        blocks.append((_label_kind(begin), begin, m.group(0)))
    if not blocks:
        raise InputError(f"{source}: malformed PEM (BEGIN line without a matching END line)")
    return blocks


def outcome(fn: object, data: bytes) -> tuple[str, object]:
    try:
        return "blocks", fn(data, "f.pem")  # type: ignore[operator]
    except InputError as exc:
        return "refused", str(exc)


_labels = st.sampled_from(["CERTIFICATE", "X509 CRL", "PRIVATE KEY", "EC PRIVATE KEY", "PUBLIC KEY",
                           "CERTIFICATE REQUEST", "FOO 1", "certificate", "", "CERT-IFICATE"])
_b64 = st.binary(max_size=60).map(lambda b: binascii.b2a_base64(b, newline=False))
_pieces = st.one_of(
    _labels.map(lambda x: b"-----BEGIN " + x.encode() + b"-----"),
    _labels.map(lambda x: b"-----END " + x.encode() + b"-----"),
    _b64,
    st.sampled_from([b"\n", b"\r\n", b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"-", b"--", b"-----",
                     b"----END ", b"-----END", b"Proc-Type: 4,ENCRYPTED\n", b"=", b"!!", b"\xff"]),
)
_documents = st.lists(_pieces, max_size=24).map(b"".join)


def _cert_like(label: str, body: bytes, end: str, sep: bytes = b"\n") -> bytes:
    lines = binascii.b2a_base64(body, newline=False)
    wrapped = sep.join(lines[i:i + 64] for i in range(0, len(lines), 64))
    return (b"-----BEGIN " + label.encode() + b"-----" + sep + wrapped + sep
            + b"-----END " + end.encode() + b"-----\n")


#: separators between body lines: every byte ``\s`` matches, and some it does not
_seps = st.sampled_from([b"\n", b"\r\n", b" ", b"\t", b"\x0b", b"\x0c", b"\x1c", b"\x85", b"\xa0", b""])
_bundles = st.lists(st.one_of(st.builds(_cert_like, _labels, st.binary(max_size=300), _labels),
                              st.builds(_cert_like, st.just("CERTIFICATE"), st.binary(max_size=200),
                                        st.just("CERTIFICATE"), _seps)),
                    max_size=4).map(b"".join)


@settings(max_examples=800, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_documents, _bundles, st.tuples(_bundles, _documents, _bundles).map(b"".join),
                 st.binary(max_size=200)))
def test_same_blocks_as_before(data: bytes) -> None:
    assert outcome(pem.pem_blocks, data) == outcome(reference, data)


def test_an_unterminated_block_is_refused_quickly() -> None:
    data = b"-----BEGIN CERTIFICATE-----" + b" " * 200_000 + b"-" * 200_000
    assert outcome(pem.pem_blocks, data)[0] == "refused"


def test_real_certificates_still_load(demo_pki: object) -> None:
    from console.core import issuance

    cert = demo_pki.host()[0]  # type: ignore[attr-defined]
    bundle = issuance.cert_pem(cert) + issuance.cert_pem(demo_pki.regions["eu-central"].cert)  # type: ignore[attr-defined]
    got = pem.load_certificates(bundle, "bundle.pem")
    assert [c.serial_number for c in got] == [cert.serial_number,
                                              demo_pki.regions["eu-central"].cert.serial_number]  # type: ignore[attr-defined]
    assert outcome(pem.pem_blocks, bundle) == outcome(reference, bundle)
