"""A tiny DER walker for making damaged certificates and CRLs the way a fuzzer finds them.

cryptography refuses to *build* broken certificates, so the tests take a good one
(issued by ``console.core.issuance`` or the openssl CLI) and change its bytes:
``decode`` turns DER into nested ``Node``s, the tests edit them, ``encode`` writes
DER again with every length recomputed. Only what the tests need (definite
lengths, tags below 31).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Node:
    tag: int
    value: bytes = b""  # primitive content
    children: list[Node] = field(default_factory=list)

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)


def _length(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    if first < 0x80:
        return first, pos + 1
    n = first & 0x7F
    return int.from_bytes(data[pos + 1:pos + 1 + n], "big"), pos + 1 + n


def decode(data: bytes) -> Node:
    node, end = _decode(data, 0)
    assert end == len(data)
    return node


def _decode(data: bytes, pos: int) -> tuple[Node, int]:
    tag = data[pos]
    length, start = _length(data, pos + 1)
    end = start + length
    if tag & 0x20:
        children = []
        p = start
        while p < end:
            child, p = _decode(data, p)
            children.append(child)
        return Node(tag, children=children), end
    return Node(tag, data[start:end]), end


def _enc_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def encode(node: Node) -> bytes:
    body = b"".join(encode(c) for c in node.children) if node.constructed else node.value
    return bytes([node.tag]) + _enc_len(len(body)) + body


def walk(node: Node) -> list[Node]:
    out = [node]
    for c in node.children:
        out.extend(walk(c))
    return out


# ------------------------------------------------------------------ certificate surgery

def tbs(cert: Node) -> Node:
    return cert.children[0]


def set_version(cert_der: bytes, version: int) -> bytes:
    """The certificate with its version field (v1=0, v3=2) set to ``version``."""
    root = decode(cert_der)
    t = tbs(root)
    assert t.children[0].tag == 0xA0  # [0] EXPLICIT version
    t.children[0].children[0].value = bytes([version])
    return encode(root)


def duplicate_extension(cert_der: bytes) -> bytes:
    """The certificate with its first extension listed twice."""
    root = decode(cert_der)
    t = tbs(root)
    exts = next(c for c in t.children if c.tag == 0xA3)  # [3] EXPLICIT extensions
    seq = exts.children[0]
    seq.children.insert(1, seq.children[0])
    return encode(root)


def damage_crl_issuer(crl_der: bytes) -> bytes:
    """The CRL with the string in its issuer name re-tagged as a BMPString of odd length."""
    root = decode(crl_der)
    t = root.children[0]  # tbsCertList: [version], signature alg, issuer, thisUpdate, ...
    issuer = next(c for c in t.children if c.tag == 0x30 and c.children and c.children[0].tag == 0x31)
    for n in walk(issuer):
        if n.tag in (0x0C, 0x13):  # UTF8String / PrintableString
            n.tag = 0x1E  # BMPString: must be an even number of bytes
            n.value = n.value + b"x" if len(n.value) % 2 == 0 else n.value
            break
    return encode(root)
