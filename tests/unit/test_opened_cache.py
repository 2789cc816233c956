"""The persistent cache of opened policies: same verdicts warm as cold, foreign or corrupt
files ignored, an unwritable directory means no cache with one notice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from console.adapters.cache import OpenedCache
from console.demo_scale import generate_scale
from console.services.fleet import FleetService


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scale(tmp_path_factory.mktemp("f") / "f", vms=60, hosts=15, owners=3, rules=8)


def check(fleet: Path) -> tuple[dict[str, object], FleetService]:
    # the whole-fleet snapshot would answer a second check before this cache is asked
    # (tests/unit/test_fleet_snapshot.py): these tests are about the per-token cache
    for snap in Path(os.environ.get("ESCORT_CACHE_DIR", "/nonexistent")).glob("fleet-*.snapshot"):
        snap.unlink()
    service = FleetService.load(fleet, eager=False)
    service.use_cache = True
    views = [v for step in service.check_in_steps() for v in step]
    return {v.uuid: (v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
            for v in views}, service


def test_warm_equals_cold_and_uses_the_cache(fleet: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    cold, s1 = check(fleet)
    assert s1._cache is not None and s1._cache.hits == 0
    files = list((tmp_path / "c").glob("opened-*"))
    assert len(files) == 1 and oct(files[0].stat().st_mode & 0o777) == "0o600"
    warm, s2 = check(fleet)
    assert s2._cache is not None and s2._cache.hits == sum(1 for _ in (fleet.parent / "policies").iterdir())
    assert warm == cold
    eager = {v.uuid: (v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
             for v in FleetService.load(fleet).vms()}
    assert warm == eager  # one verdict: the cached path decides as the uncached one


def test_a_tampered_entry_cannot_change_a_verdict_it_does_not_key(fleet: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries are keyed by the token's digest: a re-signed (changed) policy is a new key,
    so an old entry is never used for it; trust and dates are never cached."""
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "c"))
    cold, _ = check(fleet)
    path = next((tmp_path / "c").glob("opened-*"))
    data = json.loads(path.read_text())
    assert all(key.split(":", 1)[1] for key in data["entries"])
    # an entry for some other token (another digest) changes nothing for this fleet
    data["entries"] = {f"{k.split(':')[0]}:{'0' * 64}": v for k, v in data["entries"].items()}
    path.write_text(json.dumps(data))
    again, s = check(fleet)
    assert s._cache is not None and s._cache.hits == 0 and again == cold


@pytest.mark.parametrize("damage", ["garbage", "wrong-shape", "group-writable"])
def test_corrupt_or_foreign_files_are_ignored_and_rebuilt(fleet: Path, tmp_path: Path, damage: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "c"))
    cold, _ = check(fleet)
    path = next((tmp_path / "c").glob("opened-*"))
    if damage == "garbage":
        path.write_bytes(b"\x00{not json")
    elif damage == "wrong-shape":
        data = json.loads(path.read_text())
        data["entries"] = {k: ["x", 3, "y"] for k in data["entries"]}
        path.write_text(json.dumps(data))
    else:
        os.chmod(path, 0o664)
    again, s = check(fleet)
    assert again == cold and s._cache is not None and s._cache.hits == 0
    rebuilt, s3 = check(fleet)
    assert rebuilt == cold and s3._cache is not None and s3._cache.hits > 0


def test_unwritable_directory_means_no_cache_and_one_notice(fleet: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(blocker / "c"))
    result, service = check(fleet)
    assert service.cache_notice.startswith("no cache of verified results:")
    assert "\n" not in service.cache_notice
    assert result == check_uncached(fleet)


def check_uncached(fleet: Path) -> dict[str, object]:
    service = FleetService.load(fleet, eager=False)
    return {v.uuid: (v.allowed_targets, v.policy_summary, [r.code for r in v.policy_problems])
            for step in service.check_in_steps() for v in step}


def test_cache_file_name_carries_the_code_digest(tmp_path: Path) -> None:
    cache = OpenedCache(tmp_path)
    assert cache.path.name.startswith("opened-") and len(cache.path.stem) > len("opened-") + 16


def test_an_entry_whose_payload_differs_from_its_token_is_not_used(fleet: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "c"))
    cold, _ = check(fleet)
    path = next((tmp_path / "c").glob("opened-*"))
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        if entry[0] is not None:
            entry[0]["require"] = {"country": ["ZZ"]}  # as if a stale or doctored entry
    path.write_text(json.dumps(data))
    again, s = check(fleet)
    assert again == cold and s._cache is not None and s._cache.hits == 0
