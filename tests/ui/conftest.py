"""UI fixtures: the real demo fleet, generated once per session with a fixed clock and seed.

Everything on screen is deterministic: seeded Ed25519 keys (deterministic signatures),
fixed serials, UUIDs and times, and the console shows paths relative to the fleet's
folder, so the session's temporary directory never appears in a snapshot.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.app import App
from textual.pilot import Pilot
from textual.worker import WorkerCancelled

from console.demo import generate
from console.services.fleet import FleetService
from console.ui.app import EscortApp
from console.ui.config import UIConfig

AT = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
SEED = "escort-tests"


async def settle(app: App[None]) -> None:
    """Wait until no worker is running. A worker replaced by a newer one (exclusive
    workers: a new selection cancels the old computation) counts as finished."""
    for _ in range(100):
        try:
            await app.workers.wait_for_complete()
            return
        except WorkerCancelled:
            continue


async def opened(pilot: Pilot[None]) -> None:
    """Wait until the first screen is composed and mounted (switching modes is
    asynchronous; on a loaded machine one ``pause()`` is not always enough)."""
    from console.ui.screens.base import FleetScreen

    app = pilot.app
    for _ in range(250):
        await pilot.pause(0.02)
        screen = app.screen
        if isinstance(screen, FleetScreen) and screen.is_mounted and screen.query(".title-bar"):
            await settle(app)
            await pilot.pause()
            return
    raise AssertionError(f"the console did not open a screen (got {app.screen!r})")


@pytest.fixture(scope="session")
def demo_fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded demo fleet file (generated once per test session)."""
    return generate(tmp_path_factory.mktemp("ui") / "demo", at=AT, seed=SEED)


@pytest.fixture
def fleet_copy(demo_fleet: Path, tmp_path: Path) -> Path:
    """A private copy of the demo fleet that a test may break."""
    dest = tmp_path / "demo"
    shutil.copytree(demo_fleet.parent, dest)
    return dest / "fleet.toml"


@pytest.fixture
def user_themes(tmp_path: Path) -> Path:
    """An empty user theme directory (never the real ~/.config)."""
    d = tmp_path / "user-themes"
    d.mkdir()
    return d


@pytest.fixture
def make_app(demo_fleet: Path, user_themes: Path) -> Callable[..., EscortApp]:
    def factory(fleet: Path | None = None, *, readonly: bool = False,
                config: UIConfig | None = None, start_mode: str = "vms",
                themes: Path | None = None, live: bool = False) -> EscortApp:
        service = FleetService.load(fleet or demo_fleet, readonly=readonly, at=AT)
        return EscortApp(service, config=config or UIConfig(), at=AT, start_mode=start_mode,
                         user_theme_dir=themes or user_themes, live=live)

    return factory
