"""The policy memory's plain-JSON reading (adapters/state.py ``_parse_plain``): a memory file
as escort writes it is read by json's C parser alone, and only when that provably gives what
the strict reader gives; every other text goes through the strict reader as before. Here,
for a real memory file and many damaged or odd variants of it, ``_parse`` (fast path
included) answers exactly as the strict reader alone: the same entries, or the same error."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from console.adapters import state
from console.adapters.state import PolicyMemory, _parse, _parse_plain
from console.core.errors import InputError
from console.core.policy import SeenPolicy

OWNER = "fd52110b3988c1e2|CN=owner00,O=Scale Demo|owner00@scale.example"
LABEL = "owner00 <owner00@scale.example> (certified by Scale Demo Owners CA)"


def _digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest() if i else "0" * 64  # (one of digits only)


def _written(tmp_path: Path, n: int = 30) -> bytes:
    """A memory file exactly as escort writes it (``PolicyMemory.record``)."""
    memory = PolicyMemory(tmp_path / "m.json")
    memory.record({f"00000000-0000-4000-8000-{i:012d}": SeenPolicy(OWNER if i % 2 else OWNER + "x", LABEL,
                                                                 1000 + i, _digest(i))
                   for i in range(n)})
    return (tmp_path / "m.json").read_bytes()


def _strict_only(path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch) -> object:
    with monkeypatch.context() as m:
        m.setattr(state, "_parse_plain", lambda data: None)
        return _outcome(lambda: _parse(path, data))


def _outcome(parse: Callable[[], object]) -> object:
    try:
        return ("ok", dict(parse().items()))  # type: ignore[attr-defined]
    except InputError as exc:
        return ("error", str(exc))


def test_a_memory_as_escort_writes_it_takes_the_plain_path(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    data = _written(tmp_path)
    plain = _parse_plain(data)
    assert plain is not None and len(plain) == 30
    assert dict(plain.items()) == dict(_parse(tmp_path / "m.json", data).items())
    assert ("ok", dict(plain.items())) == _strict_only(tmp_path / "m.json", data, monkeypatch)
    # compact, other key order, whitespace: still plain JSON of the same entries
    body = json.loads(data)
    for text in (json.dumps(body), json.dumps(body, indent=4), json.dumps(body, sort_keys=True)[::1]):
        got = _parse_plain(text.encode())
        assert got is not None and dict(got.items()) == dict(plain.items())


def _variants(data: bytes) -> dict[str, bytes]:
    text = data.decode()
    first = text.index('"digest"')
    return {
        "duplicate uuid": text.replace('"vms": {', '"vms": {"00000000-0000-4000-8000-000000000001": '
                                       '{"digest": "d", "owner": "o", "owner_label": "l", "seq": 1}, ', 1),
        "duplicate field": text[:first] + '"seq": 99999, ' + text[first:],
        "duplicate field, colons in strings": (text[:first] + '"seq": 99999, ' + text[first:]).replace(
            LABEL, LABEL + " a:b:c"),
        "duplicate top-level key": text.replace('"version": 1', '"version": 1, "version": 1', 1),
        "duplicate vms": text.rstrip().removesuffix("}") + ', "vms": {}}',
        "NaN seq": text.replace('"seq": 1000', '"seq": NaN', 1),
        "Infinity in an extra key": text.replace('"version": 1', '"version": 1, "x": Infinity', 1),
        "out of range float in an extra key": text.replace('"version": 1', '"version": 1, "x": 1e999', 1),
        "extra top-level key": text.replace('"version": 1', '"version": 1, "x": 2', 1),
        "extra entry key": text[:first] + '"x": 1, ' + text[first:],
        "41-digit seq": text.replace('"seq": 1000', '"seq": ' + "9" * 41, 1),
        "40-digit seq": text.replace('"seq": 1000', '"seq": ' + "9" * 40, 1),
        "41 digits in a string": text.replace(LABEL, "9" * 41, 1),
        "float seq": text.replace('"seq": 1000', '"seq": 1000.0', 1),
        "bool seq": text.replace('"seq": 1000', '"seq": true', 1),
        "string seq": text.replace('"seq": 1000', '"seq": "1000"', 1),
        "null owner": text.replace(f'"owner": "{OWNER}"', '"owner": null', 1),
        "escaped letter": text.replace("owner00 <", "owner\\u0030\\u0030 <", 1),
        "lone surrogate": text.replace("owner00 <", "owner00\\ud800 <", 1),
        "surrogate pair": text.replace("owner00 <", "owner00\\ud83d\\ude00 <", 1),
        "non-ASCII": text.replace("owner00 <", "öwner00 <", 1),
        "BOM": "\ufeff" + text,
        "version 2": text.replace('"version": 1', '"version": 2', 1),
        "version true": text.replace('"version": 1', '"version": true', 1),
        "version 1.0": text.replace('"version": 1', '"version": 1.0', 1),
        "vms a list": text.replace('"vms": {', '"vms": [', 1),
        "entry a list": text.replace('"vms": {', '"vms": {"x": [], ', 1),
        "no vms": '{"version": 1}',
        "empty vms": '{"version": 1, "vms": {}}',
        "a list": "[1, 2]",
        "deep": "[" * 5000 + "]" * 5000,
        "deep in an entry": text.replace('"seq": 1000', '"seq": ' + "[" * 40 + "]" * 40, 1),
        "truncated": text[: len(text) // 2],
        "trailing data": text + "{}",
        "trailing whitespace": text + "  \n\n",
        "empty": "",
    }


def test_every_odd_memory_is_read_as_the_strict_reader_reads_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data = _written(tmp_path)
    path = tmp_path / "m.json"
    variants = {name: text.encode() for name, text in _variants(data).items()}
    variants["not UTF-8"] = data.replace(b"owner00 <", b"owner\xff <", 1)
    plain_taken = []
    for name, raw in variants.items():
        assert _outcome(lambda raw=raw: _parse(path, raw)) == _strict_only(path, raw, monkeypatch), name
        if _parse_plain(raw) is not None:
            plain_taken.append(name)
    # the variants the strict reader refuses are all among those the plain path declines
    refused = [n for n, raw in variants.items() if _strict_only(path, raw, monkeypatch)[0] == "error"]  # type: ignore[index]
    assert refused and not set(refused) & set(plain_taken)
    assert {"duplicate uuid", "duplicate field", "duplicate field, colons in strings",
            "duplicate top-level key", "duplicate vms", "NaN seq", "41-digit seq",
            "lone surrogate", "out of range float in an extra key"} <= set(refused)
    assert {"40-digit seq", "trailing whitespace", "empty vms"} <= set(plain_taken)
