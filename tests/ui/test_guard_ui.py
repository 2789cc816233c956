"""Placement violations are loud, guard state shows, Radar, and "why X Y" in the palette (80x24).

The seeded demo fleet has VMs on hosts their policies refuse (web-06 on par-02, whose
certificate expired; mail-01 on par-01, which lacks the certificate policy it needs).
"""

from __future__ import annotations

from collections.abc import Callable

from console.services.guard import GuardState
from console.ui.app import EscortApp
from console.ui.screens.misc import ProblemsScreen
from console.ui.screens.radar import RadarScreen
from console.ui.screens.trust import TrustScreen
from console.ui.screens.walkthrough import WalkthroughScreen
from console.ui.widgets.detail import DetailPane
from console.ui.widgets.vtable import VirtualTable
from tests.ui.conftest import opened

SIZE = (80, 24)
MakeApp = Callable[..., EscortApp]


def _row(app: EscortApp, name: str) -> tuple[str, ...]:
    vm = next(v for v in app.all_vms() if v.name == name)
    row = next(r for r in app.vm_rows() if r.key == vm.uuid)
    return tuple(row.cells)


async def test_misplaced_vms_marked_with_a_glyph_and_words(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        cells = _row(app, "web-06")
        assert cells[2] == "✗ par-02" and cells[3] == "✗ MISPLACED: cert.expired"
        assert _row(app, "mail-01")[3] == "✗ MISPLACED: attr.policy"
        assert _row(app, "pay-db-01")[2] == "fra-01"  # correctly placed: no marker
        # the marker is on screen (filter to the VM), not only in the model
        await pilot.press("slash", *"web-06", "enter")
        await pilot.pause()
        table = app.screen.query_one("#vms-table", VirtualTable)
        shown = [" ".join(r.cells) for r in table.rows_in_view()]
        assert any("MISPLACED" in line and "✗ par-02" in line for line in shown), shown


async def test_problems_screen_lists_placement_violations(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("p")
        await pilot.pause()
        assert isinstance(app.screen, ProblemsScreen)
        text = app.screen.query_one(DetailPane).plain
        assert "Placement (VMs running where their policy refuses them)" in text
        assert "web-06 runs on par-02, which its policy refuses" in text and "[cert.expired]" in text
        assert "pay-db-01 runs on" not in text


async def test_why_in_three_keys_from_any_screen(make_app: MakeApp) -> None:
    app = make_app(start_mode="trust")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        assert isinstance(app.screen, TrustScreen)
        await pilot.press("ctrl+p")  # 1
        await pilot.pause()
        await pilot.press(*"why web-06 par-02")  # the names (typing)
        await pilot.pause(0.5)
        await pilot.press("enter")  # 2
        await pilot.pause(0.3)
        assert isinstance(app.screen, WalkthroughScreen)
        assert app.screen.host == "par-02"
        text = app.screen.query_one(DetailPane).plain
        assert text.startswith("✗ web-06 RUNS ON par-02, WHICH ITS POLICY REFUSES")
        assert "cert.expired" in text
        # a refused pair that is not where the VM runs: the walkthrough names the failing check
        await pilot.press("escape", "ctrl+p")
        await pilot.pause()
        await pilot.press(*"why pay-db-01 ams-01")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, WalkthroughScreen) and app.screen.host == "ams-01"
        text = app.screen.query_one(DetailPane).plain
        assert "attr.country" in text and "REFUSED" in text


async def test_radar_lists_expiries_soonest_first_with_impact(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("R")
        await pilot.pause(0.3)
        assert isinstance(app.screen, RadarScreen)
        text = app.screen.query_one(DetailPane).plain
        assert text.startswith("Radar: what expires within 90 days")
        dates = [line.split()[1] for line in text.splitlines() if line[:1] in ("✗", "⚠")]
        assert dates and dates == sorted(dates)
        assert "expired on" in text and "already in effect" in text  # par-02's certificate
        assert "after " in text


async def test_hosts_screen_shows_guard_state(make_app: MakeApp) -> None:
    app = make_app(start_mode="hosts")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        cells = {r.key: tuple(r.cells) for r in app.host_rows()}
        assert cells["fra-01"][-1] == "·"  # not asked yet (no refresh in this test)
        app.guard_states = {"fra-01": GuardState("fra-01", "missing", problem="no guard hook"),
                            "fra-02": GuardState("fra-02", "stale", version="1", problem="old list"),
                            "ber-01": GuardState("ber-01", "current", version="1", trust_digest="ab" * 32)}
        app.load_views()
        cells = {r.key: tuple(r.cells) for r in app.host_rows()}
        assert (cells["fra-01"][-1], cells["fra-02"][-1], cells["ber-01"][-1]) == ("✗ none", "⚠ old", "✓ on")
        await pilot.press("p")
        await pilot.pause()
        text = app.screen.query_one(DetailPane).plain
        assert "fra-01: escort guard missing" in text and "[guard.missing]" in text
