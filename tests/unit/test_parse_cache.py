"""The cache of parse results (adapters/parsecache.py): the fleet file and the policy memory.

A stored result is used only for the same bytes, places and code; anything else -- a
changed file, a changed ``vm_files`` file, a corrupt, foreign or odd-shaped entry, a path
resolved through ``..`` -- means a full parse, which gives what no cache gives. Each
test counts the real parses (a spy on the parser) to tell a hit from a miss.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from console.adapters import fleetfile, parsecache, state
from console.adapters.fleetfile import Only, load_fleet
from console.core.errors import InputError
from console.core.inventory import FleetSpec
from console.core.policy import SeenPolicy

MIN = 'name = "f"\nkind = "demo"\ntrust_dir = "t"\nowners_trust_dir = "o"\n'


def _vms(n: int, start: int = 0, pol: str = "policies") -> str:
    return "".join(
        f'[[vms]]\nuuid = "{uuid.UUID(int=start + i + 1)}"\nname = "vm-{start + i:03d}"\nhost = "h1"\n'
        f'policy_file = "{pol}/vm-{start + i:03d}.jws"\nmemory_mib = 4096\nvcpus = 2\n\n'
        for i in range(n))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "cache"
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(where))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    parsecache.notices.clear()
    return where


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full parse of a fleet file (by its source) and of a memory file ("memory")."""
    seen: list[str] = []
    real_fleet, real_memory = fleetfile._parse_fleet, state._parse

    def fleet_spy(text: str, source: str, *args: object) -> object:
        seen.append(source)
        return real_fleet(text, source, *args)  # type: ignore[arg-type]

    def memory_spy(path: Path, data: bytes) -> object:
        seen.append("memory")
        return real_memory(path, data)

    monkeypatch.setattr(fleetfile, "_parse_fleet", fleet_spy)
    monkeypatch.setattr(state, "_parse", memory_spy)
    return seen


def uncached(path: Path, monkeypatch: pytest.MonkeyPatch, keep_vm: Only | None = None) -> FleetSpec:
    with monkeypatch.context() as m:
        m.setenv("ESCORT_NO_CACHE", "1")
        return load_fleet(path, keep_vm=keep_vm)


def _fleet(tmp_path: Path, n: int = 20, extra: str = "") -> Path:
    path = tmp_path / "fleet" / "fleet.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(MIN + extra + "[[hosts]]\nname = 'h1'\n\n" + _vms(n))
    return path


def _entry(cache: Path, what: str) -> Path:
    (found,) = cache.glob(f"parsed-{what}-*.cache")
    return found


# ---------------------------------------------------------------------------------- fleet file

def test_the_second_load_is_the_stored_result_and_equals_a_parse(
        cache: Path, tmp_path: Path, parses: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fleet(tmp_path)
    only = Only(frozenset({"vm-007"}), "vm-007")
    by_uuid = str(uuid.UUID(int=4))
    want = [uncached(path, monkeypatch, keep_vm=k)
            for k in (None, only, Only(frozenset({by_uuid}), by_uuid))]
    parses.clear()
    first = load_fleet(path)
    assert parses == [str(path)]
    again = load_fleet(path)
    assert parses == [str(path)]  # no second parse
    assert again == first == want[0]
    assert load_fleet(path, keep_vm=only) == want[1] and [v.name for v in want[1].vms] == ["vm-007"]
    assert load_fleet(path, keep_vm=Only(frozenset({by_uuid}), by_uuid)) == want[2]
    assert [v.name for v in want[2].vms] == ["vm-003"]
    assert parses == [str(path)]


def test_a_changed_fleet_file_is_parsed_again(cache: Path, tmp_path: Path, parses: list[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fleet(tmp_path)
    load_fleet(path)
    path.write_text(path.read_text().replace('name = "vm-005"', 'name = "renamed"'))
    got = load_fleet(path)
    assert len(parses) == 2 and "renamed" in {v.name for v in got.vms}
    assert got == uncached(path, monkeypatch)
    assert load_fleet(path) == got and len(parses) == 3  # (the uncached load was the third)
    # the same change to a broken file: refused, with the parser's own message
    path.write_text(path.read_text().replace('name = "renamed"', 'name = " "'))
    with pytest.raises(InputError, match=r"vms\[5\]\.name: must not be empty"):
        load_fleet(path)


def test_the_key_holds_the_directory(cache: Path, tmp_path: Path, parses: list[str]) -> None:
    """Relative paths become absolute: the same bytes in another directory (here: the
    directory renamed and another put in its place via a link) are parsed again."""
    path = _fleet(tmp_path)
    first = load_fleet(path)
    (tmp_path / "fleet").rename(tmp_path / "real")
    (tmp_path / "fleet").symlink_to(tmp_path / "real")
    moved = load_fleet(path)
    assert len(parses) == 2
    assert moved.vms[0].policy_file == str(tmp_path / "real" / "policies" / "vm-000.jws")
    assert first.vms[0].policy_file == str(tmp_path / "fleet" / "policies" / "vm-000.jws")


def test_a_path_resolved_through_dotdot_is_never_cached(cache: Path, tmp_path: Path,
                                                       parses: list[str]) -> None:
    path = _fleet(tmp_path, extra='known_hosts = "../kh"\n')
    load_fleet(path)
    load_fleet(path)
    assert len(parses) == 2 and not list(cache.glob("parsed-fleet-*"))


def test_vm_files_are_read_again_and_a_change_is_parsed_again(cache: Path, tmp_path: Path, parses: list[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fleet(tmp_path, n=2, extra='vm_files = ["vms/"]\n')
    vms = path.parent / "vms"
    vms.mkdir()
    (vms / "a.toml").write_text(_vms(3, start=10))
    first = load_fleet(path)
    assert load_fleet(path) == first and parses.count(str(path)) == 1
    (vms / "a.toml").write_text(_vms(3, start=10).replace("vm-011", "vm-eleven"))
    changed = load_fleet(path)
    assert parses.count(str(path)) == 2 and "vm-eleven" in {v.name for v in changed.vms}
    (vms / "b.toml").write_text(_vms(1, start=20))  # a new file in the directory
    assert len(load_fleet(path).vms) == 6 and parses.count(str(path)) == 3
    (vms / "b.toml").write_text("vms = 3\n")  # now broken: the parser's message
    with pytest.raises(InputError, match=r"b\.toml: vms: expected a list"):
        load_fleet(path)
    (vms / "b.toml").unlink()
    (vms / "a.toml").unlink()
    with pytest.raises(InputError, match=r"no \*\.toml files"):
        load_fleet(path)


def test_a_corrupt_entry_is_ignored_and_rebuilt(cache: Path, tmp_path: Path, parses: list[str]) -> None:
    path = _fleet(tmp_path)
    first = load_fleet(path)
    entry = _entry(cache, "fleet")
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert load_fleet(path) == first and len(parses) == 2  # parsed again ...
    assert load_fleet(path) == first and len(parses) == 2  # ... and stored again


def test_an_entry_of_the_wrong_shape_is_not_used(cache: Path, tmp_path: Path, parses: list[str]) -> None:
    """An entry whose header and digest are right but whose content is not a parse result."""
    path = _fleet(tmp_path)
    first = load_fleet(path)
    store = parsecache.ParsedCache("fleet", path, cache)
    key = store.key(str(path), str(path.parent.resolve()), os.path.expanduser("~"),
                    parsecache.file_digest(path.read_text()))
    assert store.load(key) is not None  # the key the loader uses
    stored = store.load(key)
    assert stored is not None
    (spec, cols), reads = stored
    for odd in [((spec, (cols[0][:-1], *cols[1:])), reads),  # a column too short
                ((spec, (*cols[:4], [str(x) for x in cols[4]], cols[5])), reads),  # memory as text
                ((spec, cols), (("x",),)),  # reads of another shape
                "not a result"]:
        store.save(key, odd)
        assert load_fleet(path) == first
    assert len(parses) == 1 + 4


@pytest.mark.skipif(os.getuid() != 0, reason="chown needs root")
def test_an_entry_of_another_user_is_not_used(cache: Path, tmp_path: Path, parses: list[str]) -> None:
    path = _fleet(tmp_path)
    load_fleet(path)
    entry = _entry(cache, "fleet")
    os.chown(entry, 12345, 12345)
    path.write_text(path.read_text())  # same bytes
    load_fleet(path)
    assert len(parses) == 2


def test_a_group_writable_entry_is_not_used(cache: Path, tmp_path: Path, parses: list[str]) -> None:
    path = _fleet(tmp_path)
    load_fleet(path)
    _entry(cache, "fleet").chmod(0o660)
    load_fleet(path)
    assert len(parses) == 2


def test_an_unwritable_cache_means_no_cache_and_one_notice(tmp_path: Path, parses: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(blocker / "c"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    parsecache.notices.clear()
    path = _fleet(tmp_path)
    first = load_fleet(path)
    assert load_fleet(path) == first and len(parses) == 2
    assert len(parsecache.notices) == 1 and "\n" not in parsecache.notices[0]
    assert parsecache.notices[0].startswith("no cache of verified results:")


def test_escort_no_cache_turns_it_off(cache: Path, tmp_path: Path, parses: list[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_NO_CACHE", "1")
    path = _fleet(tmp_path)
    load_fleet(path)
    load_fleet(path)
    assert len(parses) == 2 and not cache.exists()


# ---------------------------------------------------------------------------------- policy memory

def _memory(path: Path, seqs: dict[str, int]) -> Path:
    vms = {u: {"owner": f"k|CN=o{s % 3}|o@x", "owner_label": f"O{s % 3}", "seq": s, "digest": f"{s:064x}"}
           for u, s in seqs.items()}
    path.write_text(json.dumps({"version": state.STATE_VERSION, "vms": vms}, indent=1, sort_keys=True))
    return path


SEQS = {str(uuid.UUID(int=i + 1)): 10 + i for i in range(30)}


def test_the_memory_read_again_is_the_stored_result(cache: Path, tmp_path: Path, parses: list[str]) -> None:
    path = _memory(tmp_path / "m.json", SEQS)
    first = state.PolicyMemory(path).seen
    again = state.PolicyMemory(path).seen
    assert parses == ["memory"]
    assert isinstance(again, state.SeenMemory)
    want = {u: SeenPolicy(f"k|CN=o{s % 3}|o@x", f"O{s % 3}", s, f"{s:064x}") for u, s in SEQS.items()}
    assert dict(again) == dict(first) == want and again == want and list(again) == sorted(SEQS)
    assert again.get("nope") is None and "nope" not in again and len(again) == len(want)


def test_a_changed_memory_is_read_again(cache: Path, tmp_path: Path, parses: list[str]) -> None:
    path = _memory(tmp_path / "m.json", SEQS)
    state.PolicyMemory(path)
    u = next(iter(SEQS))
    _memory(path, {**SEQS, u: 99})
    assert state.PolicyMemory(path).seen[u].seq == 99 and parses == ["memory", "memory"]
    path.write_text(path.read_text().replace('"seq": 99', '"seq": "99"'))  # damaged now
    memory = state.PolicyMemory(path)
    assert "damaged entry" in memory.problem and not memory.seen


def test_a_corrupt_or_odd_memory_entry_is_not_used(cache: Path, tmp_path: Path, parses: list[str]) -> None:
    path = _memory(tmp_path / "m.json", SEQS)
    want = dict(state.PolicyMemory(path).seen)
    entry = _entry(cache, "memory")
    data = bytearray(entry.read_bytes())
    data[-5] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert dict(state.PolicyMemory(path).seen) == want and len(parses) == 2
    store = parsecache.ParsedCache("memory", path, cache)
    key = store.key(parsecache.file_digest(path.read_bytes()))
    cols = store.load(key)
    assert cols is not None
    for odd in [(cols[0], cols[1], cols[2], [str(s) for s in cols[3]], cols[4]),  # seq as text
                (cols[0][:-1], *cols[1:]),  # one column shorter
                ([cols[0][0]] * len(cols[0]), *cols[1:]),  # one VM many times
                {"not": "columns"}]:
        store.save(key, odd)
        assert dict(state.PolicyMemory(path).seen) == want
    assert len(parses) == 2 + 4


def test_recording_merges_with_a_cached_memory(cache: Path, tmp_path: Path) -> None:
    path = _memory(tmp_path / "m.json", SEQS)
    memory = state.PolicyMemory(path)
    memory = state.PolicyMemory(path)  # from the cache
    new = SeenPolicy("k|CN=n|n@x", "N", 5, "f" * 64)
    memory.record({"00000000-0000-4000-8000-000000000999": new})
    fresh = state.PolicyMemory(path).seen
    assert fresh["00000000-0000-4000-8000-000000000999"] == new and len(fresh) == len(SEQS) + 1


def test_a_parsed_cache_has_every_attribute_a_snapshot_has(tmp_path: Path) -> None:
    """ParsedCache sets up FleetSnapshot's attributes itself (FleetSnapshot's own name needs the
    slower code digest): whatever FleetSnapshot's methods use must be there."""
    from console.adapters.cache import FleetSnapshot

    snap = FleetSnapshot(tmp_path / "f.toml", tmp_path)
    parsed = parsecache.ParsedCache("fleet", tmp_path / "f.toml", tmp_path)
    assert set(vars(snap)) <= set(vars(parsed))
    assert parsed.path.parent == tmp_path and parsed.path.name.startswith("parsed-fleet-")


@pytest.mark.parametrize("key", ["vm-007", str(uuid.UUID(int=8)), str(uuid.UUID(int=8)).upper(), "twin",
                                 "nosuch", ""])
def test_only_keeps_exactly_the_rows_the_callable_keeps(key: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """``Only`` (list searches at C speed) keeps what ``uuid in keys or name == key`` keeps."""
    path = _fleet(tmp_path, n=12)
    path.write_text(path.read_text().replace('name = "vm-003"', 'name = "twin"')
                    .replace('name = "vm-009"', 'name = "twin"'))
    monkeypatch.setenv("ESCORT_NO_CACHE", "1")
    keys = frozenset({key, key.lower()})
    by_call = load_fleet(path, keep_vm=lambda u, n: u in keys or n == key)
    assert load_fleet(path, keep_vm=Only(keys, key)) == by_call
    assert len(by_call.vms) == {"twin": 2, "nosuch": 0, "": 0}.get(key, 1)


def test_a_cached_memory_compares_like_a_dict(cache: Path, tmp_path: Path) -> None:
    path = _memory(tmp_path / "m.json", SEQS)
    plain = dict(state.PolicyMemory(path).seen)
    cached = state.PolicyMemory(path).seen
    assert isinstance(cached, state.SeenMemory)
    assert cached == plain and plain == cached and cached == state.PolicyMemory(path).seen
    u = next(iter(SEQS))
    assert cached != {**plain, u: SeenPolicy("x", "x", 1, "x")} and cached != {}
    other = _memory(tmp_path / "other.json", {**SEQS, u: 99})
    state.PolicyMemory(other)
    different = state.PolicyMemory(other).seen
    assert isinstance(different, state.SeenMemory) and different != cached and cached != different
