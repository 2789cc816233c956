"""Snapshots of every screen at 80x24 and 120x40 on the seeded demo fleet.

Update after an intended change: ``pytest tests/ui/test_snapshots.py --snapshot-update``
and look at the report before committing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot

from console.ui.app import EscortApp
from tests.ui.conftest import opened, settle

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


async def _settle(pilot: Pilot[None]) -> None:
    # the libvirt refresh and the VM screen's targets run in workers
    await opened(pilot)
    await pilot.pause(0.3)  # past the VM screen's debounce
    await settle(pilot.app)
    await pilot.pause(0.1)


def _keys_then_settle(keys: tuple[str, ...]) -> Callable[[Pilot[None]], Awaitable[None]]:
    """Settle, press ``keys``, settle again: what a key changes (a new selection's targets are
    computed in a worker after a debounce) is on screen before the snapshot. (Given to
    ``snap_compare`` as ``press``, the keys came after ``run_before``, and the snapshot only
    waited for the screen to be idle: under load, the filtered table was taken with the previous
    VM's targets -- CI, 2026-11-29.)"""
    async def run(pilot: Pilot[None]) -> None:
        await _settle(pilot)
        if keys:
            await pilot.press(*keys)
            await pilot.pause(0.3)
            await settle(pilot.app)
            await pilot.pause(0.1)
    return run


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    ("screen", "start", "keys"),
    [
        pytest.param("vms", "vms", (), id="vms"),
        pytest.param("vms-filter", "vms", ("slash", *"ana", "enter"), id="vms-filter"),
        pytest.param("vms-targets", "vms", ("down", "down", "down", "down", "tab", "down"),
                     id="vms-targets"),
        pytest.param("walkthrough-allowed", "vms", ("tab", "enter"), id="walkthrough-allowed"),
        pytest.param("walkthrough-refused", "vms", ("tab", "down", "down", "w"),
                     id="walkthrough-refused"),
        pytest.param("trust", "trust", (), id="trust"),
        pytest.param("trust-revoked", "trust", ("down",) * 5, id="trust-revoked"),
        pytest.param("hosts", "hosts", (), id="hosts"),
        pytest.param("hosts-expired", "hosts", ("down",) * 4, id="hosts-expired"),
        pytest.param("migrations", "migrations", (), id="migrations"),
        pytest.param("help", "vms", ("question_mark",), id="help"),
        pytest.param("problems", "vms", ("p",), id="problems"),
        pytest.param("confirm-migrate", "vms", ("tab", "m"), id="confirm-migrate"),
    ],
)
def test_screen(snap_compare: Callable[..., bool], make_app: Callable[..., EscortApp],
                screen: str, start: str, keys: tuple[str, ...], size: tuple[int, int]) -> None:
    app = make_app(start_mode=start, live=True)
    assert snap_compare(app, terminal_size=size, run_before=_keys_then_settle(keys))


@pytest.mark.parametrize("size", SIZES)
def test_readonly_screen(snap_compare: Callable[..., bool], make_app: Callable[..., EscortApp],
                         size: tuple[int, int]) -> None:
    assert snap_compare(make_app(readonly=True), terminal_size=size, run_before=_settle)


def test_missing_fleet_screen(snap_compare: Callable[..., bool], make_app: Callable[..., EscortApp]) -> None:
    app = make_app(Path("/nonexistent/escort/fleet.toml"))
    assert snap_compare(app, terminal_size=(80, 24), run_before=_settle)
