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
