"""UI fixtures: the real demo fleet, generated once with a fixed clock and seed.

The snapshot demo lives at a fixed path (SNAP_DIR) because file paths appear on
screen (libvirt URIs, certificate files); everything else about it is deterministic
(seeded Ed25519 keys, fixed serials, UUIDs and times).
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from console.demo import generate
from console.services.fleet import FleetService
from console.ui.app import EscortApp
from console.ui.config import UIConfig

AT = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
SEED = "escort-tests"
SNAP_DIR = Path("/tmp/escort-ui-tests/demo")


@pytest.fixture(scope="session")
def demo_fleet() -> Path:
    """The seeded demo fleet file (regenerated once per test session)."""
    shutil.rmtree(SNAP_DIR, ignore_errors=True)
    return generate(SNAP_DIR, at=AT, seed=SEED)


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
