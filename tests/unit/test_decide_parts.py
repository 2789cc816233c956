"""Parts of the start-up check's per-VM decide made cheaper (u2): each against what it replaced.

* ``HostIndex.names_of`` finds a mask's set bits with ``str.find`` over its binary digits;
  the reference is the former loop (one shift per host).
* ``Requirements`` computes its hash once per object; it must be the dataclass's own hash
  (of the fields, in order), and never travel in a pickle (a hash of strings is valid only
  in the process that made it: another process would look equal requirements up under a
  stale hash).
"""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from console.core.decisions import HostIndex
from console.core.policy import Requirements


def reference_names_of(names: tuple[str, ...], mask: int) -> tuple[str, ...]:
    out = []
    i = 0
    while mask:
        if mask & 1:
            out.append(names[i])
        mask >>= 1
        i += 1
    return tuple(out)


@settings(max_examples=400, deadline=None)
@given(size=st.integers(0, 1100), data=st.data())
def test_names_of_is_the_former_loop(size: int, data: st.DataObject) -> None:
    names = tuple(f"host-{i}" for i in range(size))
    bits = data.draw(st.sets(st.integers(0, size - 1), max_size=size) if size else st.just(set[int]()))
    mask = sum(1 << b for b in bits)
    index = HostIndex(names)
    assert index.names_of(mask) == reference_names_of(names, mask)


@pytest.mark.parametrize("mask", [0, 1, 2, 3, (1 << 999), (1 << 1000) - 1, 0b1010_0000_0101])
def test_names_of_edges(mask: int) -> None:
    names = tuple(f"h{i}" for i in range(1000))
    assert HostIndex(names).names_of(mask) == reference_names_of(names, mask)
    with pytest.raises(IndexError):
        HostIndex(names[:3]).names_of(1 << 3)  # (as the former loop: no host for that bit)
    with pytest.raises(ValueError):
        HostIndex(names).names_of(-1)  # (the former loop never ended)


def fields_hash(r: Requirements) -> int:
    return hash(tuple(getattr(r, f.name) for f in dataclasses.fields(r)))


VALUES = st.frozensets(st.sampled_from(["a", "b", "DE", "US", ""]), max_size=3)
REQS = st.builds(Requirements, **{f.name: VALUES for f in dataclasses.fields(Requirements)})


@settings(max_examples=200, deadline=None)
@given(a=REQS, b=REQS)
def test_requirements_hash_is_the_dataclass_hash(a: Requirements, b: Requirements) -> None:
    assert hash(a) == fields_hash(a)
    assert hash(a) == hash(a)  # (the cached value)
    if a == b:
        assert hash(a) == hash(b)
    assert {a: 1}.get(dataclasses.replace(a)) == 1  # an equal object, hashed on its own
    copy = pickle.loads(pickle.dumps(a))
    assert "_hash" not in copy.__dict__  # (hashed again where it is used)
    assert copy == a and hash(copy) == hash(a)


def test_a_pickled_requirement_carries_no_hash() -> None:
    r = Requirements(trusted_cas=frozenset({"ab" * 32}), country=frozenset({"DE"}))
    hash(r)
    assert "_hash" in r.__dict__
    blob = pickle.dumps(r)
    assert b"_hash" not in blob
    assert blob == pickle.dumps(Requirements(trusted_cas=frozenset({"ab" * 32}), country=frozenset({"DE"})))
    # in another process (another string hash seed) it hashes as that process's objects do
    code = ("import pickle, sys; r = pickle.loads(sys.stdin.buffer.read()); "
            "from console.core.policy import Requirements as R; "
            "print(hash(r) == hash(R(trusted_cas=r.trusted_cas, country=r.country)), "
            "{R(trusted_cas=r.trusted_cas, country=r.country): 1}.get(r))")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.decode().split()
    assert out == ["True", "1"]
