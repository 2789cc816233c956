"""The console's start-up check and what it leaves behind (issue 12, the shape of the cold
start): the cyclic garbage collector is off only while a check runs, also when the check is
replaced or the console quits half-way."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console.demo_scale import generate_scale
from console.services.fleet import FleetService
from console.ui.app import EscortApp
from console.ui.config import UIConfig


@pytest.fixture(scope="module")
def scale_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scale(tmp_path_factory.mktemp("shape") / "f", vms=60, hosts=8, owners=3, rules=5)


async def test_a_check_cut_short_hands_the_collector_back(scale_fleet: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The console quits while its check is half-way (its worker is cancelled): the check's
    generator is closed then and there, so collection is on again -- not left off until
    something happens to free the generator (here a reference is kept elsewhere)."""
    made: list[Iterator[Any]] = []
    original = FleetService.check_in_steps

    def one_vm_a_step(self: FleetService, **kwargs: Any) -> Iterator[Any]:
        steps = original(self, budget_s=0.0)  # a step per VM: the check takes many loop turns
        made.append(steps)
        return steps

    monkeypatch.setattr(FleetService, "check_in_steps", one_vm_a_step)
    assert gc.isenabled()
    lazy = FleetService.load(scale_fleet, eager=False)
    app = EscortApp(lazy, config=UIConfig(), live=False)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            for _ in range(500):
                await pilot.pause(0.01)
                if app.check_decided:
                    break
            assert app.checking and 0 < app.check_decided < len(app.vm_rows())
            assert not gc.isenabled()  # (off while the check runs)
        assert made and made[0].gi_frame is None  # closed, though still referenced here
        assert gc.isenabled()
    finally:
        for steps in made:
            steps.close()
        gc.enable()


async def test_the_check_ends_before_its_bookkeeping(scale_fleet: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """When the last verdict is in, the console ends the check for the operator at once --
    the title's count gone, ``checking`` off (the targets pane lists its reasons), the
    placement marks and the fleet's rows final -- and only then writes the policy memory and
    the snapshot (held back here until the check is seen to be over). Then it writes them."""
    from console.adapters.cache import FleetSnapshot

    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    release: list[bool] = []
    held: list[bool] = []
    original = FleetService._after_check

    def after_the_end(self: FleetService, *args: Any, **kwargs: Any) -> Iterator[Any]:
        while not release:
            held.append(True)
            yield []
        yield from original(self, *args, **kwargs)

    monkeypatch.setattr(FleetService, "_after_check", after_the_end)
    lazy = FleetService.load(scale_fleet, eager=False)
    lazy.use_cache = True
    app = EscortApp(lazy, config=UIConfig(), live=False)
    changed: list[bool] = []
    snapshot = FleetSnapshot(scale_fleet).path
    async with app.run_test(size=(80, 24)) as pilot:
        app.fleet_changed.subscribe(app, lambda _: changed.append(app.checking))
        for _ in range(500):
            await pilot.pause(0.01)
            if not app.checking:
                break
        assert not app.checking and held and changed == [False]
        assert not snapshot.exists() and lazy._memory_path is not None and not lazy._memory_path.exists()
        assert app.check_decided == len(app.vm_rows()) and not app.check_words()
        assert all(not v.checking for v in app._vms)
        release.append(True)
        for _ in range(500):
            await pilot.pause(0.01)
            if snapshot.exists():
                break
        assert snapshot.is_file() and lazy._memory_path.is_file()
        for _ in range(500):
            await pilot.pause(0.01)
            if app._check_steps is None:
                break
        # the check's end handed its heap back to the collector; the console's views and rows,
        # which live as long as it does, are frozen again (no full pass walks them)
        assert gc.isenabled() and gc.get_freeze_count() > 0
        view = app._vms[0]
        assert gc.is_tracked(view) and not any(o is view for o in gc.get_objects())
