"""The policy memory file is read whole and strictly: the fast path (every entry checked a
field at a time) accepts and refuses exactly what the entry-by-entry loop does."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from console.adapters import state
from console.core.errors import InputError
from console.core.policy import SeenPolicy

GOOD: dict[str, Any] = {"owner": "k|CN=a|a@x", "owner_label": "A <a@x>", "seq": 7, "digest": "ab" * 32}


def _write(path: Path, vms: Mapping[str, object]) -> Path:
    path.write_text(json.dumps({"version": state.STATE_VERSION, "vms": vms}))
    return path


def test_well_formed_entries_are_read(tmp_path: Path) -> None:
    vms = {f"00000000-0000-4000-8000-{i:012d}": {**GOOD, "seq": i} for i in range(50)}
    seen, raw = state._read(_write(tmp_path / "s.json", vms))
    assert seen == {u: SeenPolicy(GOOD["owner"], GOOD["owner_label"], e["seq"], GOOD["digest"])
                    for u, e in vms.items()}
    assert raw == (tmp_path / "s.json").read_bytes()
    assert state._read(_write(tmp_path / "e.json", {}))[0] == {}


@pytest.mark.parametrize("damage", [
    {"seq": True}, {"seq": 1.0}, {"seq": "7"}, {"seq": None}, {"owner": 1}, {"owner_label": None},
    {"digest": ["x"]}, "not a table", None, 3, [GOOD],
])
def test_a_damaged_entry_is_named(tmp_path: Path, damage: object) -> None:
    entry = {**GOOD, **damage} if isinstance(damage, dict) else damage
    vms = {"a": GOOD, "b": entry, "c": GOOD}
    with pytest.raises(InputError, match="damaged entry for VM b"):
        state._read(_write(tmp_path / "s.json", vms))


@pytest.mark.parametrize("missing", ["owner", "owner_label", "seq", "digest"])
def test_an_entry_without_a_field_is_named(tmp_path: Path, missing: str) -> None:
    entry = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(InputError, match="damaged entry for VM b"):
        state._read(_write(tmp_path / "s.json", {"a": GOOD, "b": entry}))
