"""Snapshots of every screen at 80x24 and 120x40 on the seeded demo fleet.

Update after an intended change: ``pytest tests/ui/test_snapshots.py --snapshot-update``
and look at the report before committing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from textual.pilot import Pilot

from console.ui.app import EscortApp

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


async def _settle(pilot: Pilot[None]) -> None:
    await pilot.pause(0.3)  # the VM screen computes targets just after the first paint


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    ("screen", "start", "keys"),
    [
        ("vms", "vms", ()),
        ("vms-filter", "vms", ("slash", *"ana", "enter")),
        ("vms-targets", "vms", ("down", "down", "down", "down", "tab", "down")),
        ("walkthrough-allowed", "vms", ("tab", "enter")),
        ("walkthrough-refused", "vms", ("tab", "down", "down", "w")),
        ("trust", "trust", ()),
        ("trust-revoked", "trust", ("down", "down", "down", "down", "down")),
        ("hosts", "hosts", ()),
        ("hosts-expired", "hosts", ("down", "down", "down", "down")),
        ("migrations", "migrations", ()),
        ("help", "vms", ("question_mark",)),
    ],
)
def test_screen(snap_compare: Callable[..., bool], make_app: Callable[..., EscortApp],
                screen: str, start: str, keys: tuple[str, ...], size: tuple[int, int]) -> None:
    app = make_app(start_mode=start)
    assert snap_compare(app, press=keys, terminal_size=size, run_before=_settle)


@pytest.mark.parametrize("size", SIZES)
def test_readonly_screen(snap_compare: Callable[..., bool], make_app: Callable[..., EscortApp],
                         size: tuple[int, int]) -> None:
    assert snap_compare(make_app(readonly=True), terminal_size=size, run_before=_settle)


def test_missing_fleet_screen(snap_compare: Callable[..., bool], make_app: Callable[..., EscortApp],
                              tmp_path_factory: pytest.TempPathFactory) -> None:
    from pathlib import Path

    app = make_app(Path("/tmp/escort-ui-tests/missing/fleet.toml"))
    assert snap_compare(app, terminal_size=(80, 24), run_before=_settle)
