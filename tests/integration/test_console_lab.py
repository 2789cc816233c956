"""The console, driven with Pilot on the lab: an admin migrates a VM between regions.

Keys and buttons as an operator would use them (VMs tab → target → m → pre-flight →
Migrate… → type the name → Migrate), through the jump host to real libvirt/QEMU with
TLS; then the panel must say "moved" with the downtime, and each host's own libvirt
must show the VM on the target only. The VM is migrated back at the end (the lab is
shared by the session's other tests).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from textual.pilot import Pilot
from textual.widgets import Button, DataTable, Input, Label, Static

from console.services.fleet import FleetService
from console.ui.app import EscortApp
from console.ui.config import UIConfig
from console.ui.screens.migrations import MigrationsScreen, PreflightScreen, hub_for
from console.ui.screens.vms import VMsScreen
from console.ui.widgets.dialogs import ConfirmDialog
from console.ui.widgets.progress import MigrationPanel
from console.ui.widgets.vtable import VirtualTable

if TYPE_CHECKING:
    from console.lab import Lab

pytestmark = pytest.mark.lab

ADMIN = "lab-admin"
VM = "app-1"
HOME = "par-1"
AWAY = "fra-1"  # another region: par-1 and fra-1 are reached through the jump host


def running_on(lab: Lab, uuid: str) -> dict[str, str]:
    """host -> libvirt state of ``uuid``, asked of every hypervisor's own libvirt socket."""
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    from console.adapters.libvirt import state_name

    out: dict[str, str] = {}
    for host in lab.hypervisors:
        conn = lab.open_libvirt(host)
        try:
            dom = conn.lookupByUUIDString(uuid)
            out[host] = state_name(*dom.state())[0]
        except libvirt.libvirtError:
            pass
        finally:
            conn.close()
    return out


async def wait_for(pilot: Pilot[None], cond: Callable[[], bool], what: str, seconds: float = 60) -> None:
    for _ in range(int(seconds / 0.1)):
        if cond():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


async def migrate_from_console(pilot: Pilot[None], app: EscortApp, vm_uuid: str,
                               target: str) -> MigrationPanel:
    await app.switch_mode("vms")
    await wait_for(pilot, lambda: isinstance(app.screen, VMsScreen), "the VMs tab")
    await wait_for(pilot, lambda: not app.refreshing, "the refresh")
    screen = app.screen
    assert isinstance(screen, VMsScreen)
    # the table fills in after the refresh (rows first, progressively): wait for the VM's row
    await wait_for(pilot, lambda: screen.focus_vm(vm_uuid), "the VM's row", seconds=30)
    targets = screen.query_one("#targets", VirtualTable)
    title = screen.query_one("#targets-title", Label)
    # the targets follow the selection after a short debounce; wait for this VM's
    await wait_for(pilot, lambda: f"Targets for {VM}:" in str(title.render())
                   and " allowed" in str(title.render()), "the VM's targets")
    assert targets.move_to_key(target), str(title.render())
    targets.focus()
    await pilot.press("m")
    await wait_for(pilot, lambda: isinstance(app.screen, PreflightScreen),
                   f"the pre-flight (last error: {app.last_error!r})", seconds=10)
    pf_screen = app.screen
    assert isinstance(pf_screen, PreflightScreen)
    await wait_for(pilot, lambda: pf_screen.result is not None, "the pre-flight result")
    await pilot.pause()
    checks = str(pf_screen.query_one("#pf-checks", Static).render())
    assert checks.count("✓") == 7 and "✗" not in checks, checks
    go = pf_screen.query_one("#go", Button)
    assert not go.disabled
    go.press()
    await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the confirmation")
    dialog = app.screen
    # the dialog takes focus right after it is pushed: wait for that (under load it is not
    # instant), then check it is on Cancel
    await wait_for(pilot, lambda: app.focused is not None, "the dialog's focus", seconds=10)
    focused = app.focused
    assert isinstance(focused, Button) and focused.id == "cancel"
    dialog.query_one("#dialog-typed", Input).value = VM
    await pilot.pause()
    dialog.query_one("#confirm", Button).press()
    hub = hub_for(app)
    before = len(hub.runs)
    await wait_for(pilot, lambda: len(hub.runs) > before, "the migration to start")
    run = hub.runs[-1]
    await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "the Migrations tab")
    await wait_for(pilot, lambda: run.done, "the migration to end", seconds=180)
    panel_id = f"#run-{run.id}"
    await wait_for(pilot, lambda: bool(app.screen.query(panel_id)), "the panel")
    panel = app.screen.query_one(panel_id, MigrationPanel)
    await wait_for(pilot, lambda: panel.outcome is not None, "the panel to show the outcome", seconds=5)
    return panel


async def test_console_migrates_across_regions_through_the_jump_host_and_back(lab: Lab,
                                                                             tmp_path: Path) -> None:
    service = FleetService.load(lab.fleet_file)
    themes = tmp_path / "themes"
    themes.mkdir()
    app = EscortApp(service, config=UIConfig(), admin=ADMIN, user_theme_dir=themes, live=True)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: any(v.name == VM for v in app.all_vms()), "the lab's VMs")
        uuid = next(v.uuid for v in app.all_vms() if v.name == VM)
        assert running_on(lab, uuid) == {HOME: "running"}, "the lab is not as the tests expect"
        try:
            panel = await migrate_from_console(pilot, app, uuid, AWAY)
            text = panel.plain()
            assert panel.progress is not None and panel.progress.phase == "completed", text
            assert "MOVED: verified running on fra-1" in text, text
            assert panel.progress.downtime_ms is not None and "Downtime" in text, text
            assert running_on(lab, uuid) == {AWAY: "running"}  # on fra-1 only, checked outside
        finally:
            # back home, whatever happened (the lab is shared by the session)
            if running_on(lab, uuid) == {AWAY: "running"}:
                back = await migrate_from_console(pilot, app, uuid, HOME)
                assert "MOVED: verified running on par-1" in back.plain(), back.plain()
        assert running_on(lab, uuid) == {HOME: "running"}


async def test_console_evacuates_a_host_in_a_few_keys_and_shows_the_summary(lab: Lab, tmp_path: Path) -> None:
    """Hosts tab → e on par-1 → g → type "evacuate" → the board ends with the summary."""
    from console.ui.screens.evacuation import EvacuationScreen
    from console.ui.screens.hosts import HostsScreen

    service = FleetService.load(lab.fleet_file)
    themes = tmp_path / "themes"
    themes.mkdir()
    app = EscortApp(service, config=UIConfig(), admin=ADMIN, user_theme_dir=themes, live=True,
                    start_mode="hosts")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: any(v.name == VM for v in app.all_vms()), "the lab's VMs")
        uuid = next(v.uuid for v in app.all_vms() if v.name == VM)
        assert running_on(lab, uuid) == {HOME: "running"}, "the lab is not as the tests expect"
        await wait_for(pilot, lambda: isinstance(app.screen, HostsScreen), "the Hosts tab")
        assert app.screen.query_one("#hosts-table", VirtualTable).move_to_key(HOME)
        try:
            await pilot.press("e")
            await wait_for(pilot, lambda: isinstance(app.screen, EvacuationScreen), "the board")
            board = app.screen
            assert isinstance(board, EvacuationScreen)
            await wait_for(pilot, lambda: board.planned is not None, "the plan")
            assert board.planned is not None and [m.vm.name for m in board.planned.moves] == [VM]
            target = board.planned.moves[0].target
            await pilot.press("g")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the confirmation")
            assert isinstance(app.focused, Button) and app.focused.id == "cancel"
            app.screen.query_one("#dialog-typed", Input).value = "evacuate"
            await pilot.pause()
            app.screen.query_one("#confirm", Button).press()
            await wait_for(pilot, lambda: board.summary is not None, "the summary", seconds=180)
            assert board.summary is not None
            assert [u.name for u in board.summary.moved] == [VM], board.summary.text()
            await pilot.pause(0.6)  # the board redraws at most twice a second
            assert f"moved   {VM}: {HOME} -> {target}" in str(board.query_one("#ev-detail", Static).render())
            assert "✓ moved" in [str(c) for c in board.query_one("#ev-board", DataTable).get_row(uuid)]
            assert running_on(lab, uuid) == {target: "running"}
            await pilot.press("escape")
        finally:
            where = running_on(lab, uuid)
            if where != {HOME: "running"} and len(where) == 1:
                back = await migrate_from_console(pilot, app, uuid, HOME)
                assert "MOVED" in back.plain(), back.plain()
        assert running_on(lab, uuid) == {HOME: "running"}


async def test_console_abort_key_stops_a_migration_and_shows_the_vm_on_its_source(
        lab: Lab, tmp_path: Path) -> None:
    """A slow migration (RAM full of random bytes, bandwidth capped) is watched live on its
    panel (indeterminate, then a real bar and a rate), then aborted with ``a`` → confirm."""
    import tomllib

    import tomli_w

    from console.services.migration import MigrationService
    from tests.integration.test_migration_lab import _grant, _remove

    # a fleet file of our own with a grants directory for the guest this test creates
    doc = tomllib.loads(lab.fleet_file.read_text(encoding="utf-8"))
    (lab.dir / "mig-grants").mkdir(exist_ok=True)
    doc["grants"] = [*doc.get("grants", []), "mig-grants"]
    fleet_path = lab.dir / "fleet-console-abort.toml"
    fleet_path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    name = "ui-abort"
    uuid = lab.define_guest(AWAY, name, memory_mib=128, random_fill_mib=96, owner="alice")
    _grant(lab, fleet_path, uuid)
    try:
        service = FleetService.load(fleet_path)
        themes = tmp_path / "themes"
        themes.mkdir()
        app = EscortApp(service, config=UIConfig(), admin=ADMIN, user_theme_dir=themes, live=True)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: any(v.name == name for v in app.all_vms()), "the guest")
            await wait_for(pilot, lambda: not app.refreshing, "the refresh")
            hub = hub_for(app)
            # 12 MiB/s: ~8 s for 96 MiB, time enough to watch and abort
            hub._service = MigrationService(service, app.inventory_service(), bandwidth_mib_s=12)
            await app.switch_mode("vms")
            await wait_for(pilot, lambda: isinstance(app.screen, VMsScreen), "the VMs tab")
            screen = app.screen
            assert isinstance(screen, VMsScreen)
            # the table fills in after the refresh: wait for the guest's row
            await wait_for(pilot, lambda: screen.focus_vm(uuid), "the guest's row", seconds=30)
            title = screen.query_one("#targets-title", Label)
            await wait_for(pilot, lambda: f"Targets for {name}:" in str(title.render())
                           and " allowed" in str(title.render()), "the VM's targets")
            targets = screen.query_one("#targets", VirtualTable)
            assert targets.move_to_key(HOME)
            targets.focus()
            await pilot.press("m")
            await wait_for(pilot, lambda: isinstance(app.screen, PreflightScreen), "the pre-flight")
            pf_screen = app.screen
            assert isinstance(pf_screen, PreflightScreen)
            await wait_for(pilot, lambda: pf_screen.result is not None, "the pre-flight result")
            await pilot.pause()
            pf_screen.query_one("#go", Button).press()
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the confirmation")
            app.screen.query_one("#dialog-typed", Input).value = name
            await pilot.pause()
            app.screen.query_one("#confirm", Button).press()
            await wait_for(pilot, lambda: bool(hub.runs), "the run")
            run = hub.runs[-1]
            await wait_for(pilot, lambda: isinstance(app.screen, MigrationsScreen), "the Migrations tab")
            await wait_for(pilot, lambda: bool(run.progress.data_total) and run.progress.rate_bps > 0,
                           "data to flow", seconds=30)
            await pilot.pause(0.6)  # one redraw
            panel = app.screen.query_one(f"#run-{run.id}", MigrationPanel)
            assert "MiB/s" in panel.plain() and "sent of ?" not in panel.plain(), panel.plain()
            panel.focus()
            await pilot.press("a")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the abort confirmation")
            assert isinstance(app.focused, Button) and app.focused.id == "cancel"
            app.screen.query_one("#confirm", Button).press()
            await wait_for(pilot, lambda: run.done, "the abort", seconds=60)
            await wait_for(pilot, lambda: panel.outcome is not None, "the outcome on the panel", seconds=5)
            text = panel.plain()
            assert "ABORTED" in text and f"still running on {AWAY} (checked)" in text, text
        assert running_on(lab, uuid) == {AWAY: "running"}
    finally:
        _remove(lab, uuid)
