"""Start-up at scale: rows first with an honest "checking…", verdicts streamed in, and the
streamed verdicts equal to what the fleet service decides in one go (one verdict)."""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.pilot import Pilot

from console.demo_scale import generate_scale
from console.services.fleet import FleetService
from console.ui.app import EscortApp
from console.ui.config import UIConfig
from console.ui.widgets.vtable import VirtualTable
from tests.ui.conftest import settle


@pytest.fixture(scope="module")
def scale_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scale(tmp_path_factory.mktemp("scale") / "f", vms=120, hosts=30, owners=4, rules=12)


async def checked(app: EscortApp, pilot: Pilot[None]) -> None:
    """Until the start-up check is done and its last rows reached the table (it starts after
    the first paint and signals the screen after its worker ends: on a loaded machine one
    ``settle`` can come too early). Bounded; the assertions after it decide."""
    for _ in range(500):
        await settle(app)
        await pilot.pause(0.02)
        if app.checking:
            continue
        table = app.screen.query_one("#vms-table", VirtualTable)
        if not any(row.cells[4] == "checking…" for row in table.rows_in_view()):
            return


async def test_rows_first_then_every_verdict_streamed_in(scale_fleet: Path) -> None:
    lazy = FleetService.load(scale_fleet, eager=False)
    app = EscortApp(lazy, config=UIConfig(), live=False)
    assert app.progressive and app.checking
    # before the check: every row is "checking…", never a count, and nothing was decided yet
    # (a whole-fleet check before the first paint is what made start-up grow with the fleet)
    assert {row.cells[4] for row in app.vm_rows()} == {"checking…"}
    assert lazy._matrix is None and not lazy._chains
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
        assert not app.checking
        table = app.screen.query_one("#vms-table", VirtualTable)
        shown = {row.key: row.cells[4] for row in table.rows_in_view()}
    eager = FleetService.load(scale_fleet)  # the whole fleet checked at once, separately
    expected = {v.uuid: v for v in eager.vms()}
    n = len(eager.hosts())
    assert set(shown) == set(expected)
    for key, cell in shown.items():
        vm = expected[key]
        want = f"{len(vm.allowed_targets)}/{n}" if not vm.policy_problems else "✗ 0"
        assert cell == want, (vm.name, cell, want)
    assert any(len(v.allowed_targets) for v in expected.values())  # not all refusals


async def test_an_unreadable_policy_file_is_a_problem_not_a_crash(scale_fleet: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(scale_fleet.parent, copy)
    victim = sorted((copy / "policies").iterdir())[3]
    victim.unlink()
    app = EscortApp(FleetService.load(copy / "fleet.toml", eager=False), config=UIConfig(), live=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
        assert not app.checking
        assert any(victim.name in p for p in app.all_problems())
        row = next(r for r in app.vm_rows() if r.cells[0] == victim.stem)
        assert row.cells[4] == "✗ 0"  # refused with its reason, not "checking…", not a count


async def test_a_warm_start_streams_the_snapshots_verdicts(scale_fleet: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The console's warm path (snapshot of the last check, loaded beside the event loop, the
    first rows' verdicts first): the rows say what a check without any cache says."""
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    shown: list[dict[str, str]] = []
    sources = []
    for _ in range(2):  # the first launch writes the snapshot, the second reuses it
        lazy = FleetService.load(scale_fleet, eager=False)
        lazy.use_cache = True
        app = EscortApp(lazy, config=UIConfig(), live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await checked(app, pilot)
            assert not app.checking
            shown.append({row.key: row.cells[4] for row in app.vm_rows()})
        sources.append(lazy.check_source)
    assert sources == ["computed", "snapshot"]
    eager = FleetService.load(scale_fleet)
    n = len(eager.hosts())
    expected = {v.uuid: f"{len(v.allowed_targets)}/{n}" if not v.policy_problems else "✗ 0"
                for v in eager.vms()}
    assert shown[1] == shown[0] == expected


async def test_the_footer_recomposes_once_for_a_burst_of_binding_changes(
        scale_fleet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from console.ui.screens.base import EscortFooter

    app = EscortApp(FleetService.load(scale_fleet, eager=False), config=UIConfig(), live=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await checked(app, pilot)
        calls = []
        original = EscortFooter.recompose

        async def counted(self: EscortFooter) -> None:
            calls.append(self)
            await original(self)

        monkeypatch.setattr(EscortFooter, "recompose", counted)
        for _ in range(5):
            app.screen.refresh_bindings()
        await settle(app)
        await pilot.pause(0.1)
        assert len(calls) == 1
        keys = [str(k.render()) for k in app.screen.query("FooterKey")]
        assert keys  # the footer still shows its keys after the recompose
