"""Pilot tests of the console's flows on the real (seeded) demo fleet at 80x24."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from textual.widgets import Button, Input, Tree

from console.demo import VMS
from console.ui.app import EscortApp
from console.ui.config import UIConfig
from console.ui.screens.hosts import HostsScreen
from console.ui.screens.migrations import PreflightScreen
from console.ui.screens.misc import HelpScreen, ProblemsScreen
from console.ui.screens.trust import TrustScreen
from console.ui.screens.vms import VMsScreen
from console.ui.screens.walkthrough import WalkthroughScreen
from console.ui.widgets.detail import DetailPane
from console.ui.widgets.dialogs import ConfirmDialog
from console.ui.widgets.vtable import VirtualTable
from tests.ui.conftest import opened, settle

SIZE = (80, 24)
MakeApp = Callable[..., EscortApp]


def vm_table(app: EscortApp) -> VirtualTable:
    return app.screen.query_one("#vms-table", VirtualTable)


def targets(app: EscortApp) -> VirtualTable:
    return app.screen.query_one("#targets", VirtualTable)


def target_lines(app: EscortApp) -> list[str]:
    return [" ".join(c for c in row.cells if c) for row in targets(app).rows_in_view()]


async def test_opens_on_vms_with_kind_in_title(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        assert isinstance(app.screen, VMsScreen)
        assert vm_table(app).total_count == len(VMS) == 28
        title = str(app.screen.query_one(".title-bar").render())
        assert "demo — libvirt test driver, nothing really migrates" in title


async def test_filter_as_you_type_and_escape_clears(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("slash", "p", "a", "y", "-", "d", "b")
        await pilot.pause()
        table = vm_table(app)
        names = [app.vm_by_key(k).name for k in table.visible_keys()]  # type: ignore[union-attr]
        assert names == ["pay-db-01", "pay-db-02", "pay-db-03", "pay-db-04"]
        await pilot.press("backspace", "backspace", "backspace")  # "pay" -> pay-db + pay-api
        await pilot.pause()
        assert table.row_count == 7
        await pilot.press("escape")
        await pilot.pause()
        assert table.row_count == len(VMS) and table.has_focus
        assert not app.screen.query_one("#filter", Input).display


async def test_filter_matches_owner_and_host_columns(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("slash", *"tyo-01")
        await pilot.pause()
        names = [app.vm_by_key(k).name for k in vm_table(app).visible_keys()]  # type: ignore[union-attr]
        assert names == ["res-gpu-01"]


async def test_slash_in_targets_filters_the_targets(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        await pilot.press("tab", "slash", *"revoked")
        await pilot.pause()
        assert vm_table(app).row_count == len(VMS)  # the VM table is untouched
        rows = targets(app).rows_in_view()
        assert {row.key for row in rows} == {"ams-02", "sgp-01", "tyo-01"}  # and the revoked CA's
        assert rows[0].cells[1] == "ams-02"  # each host's whole group: verdict line + reasons
        assert any("attr.country" in row.cells[1] for row in rows)
        await pilot.press("escape")
        await pilot.pause()
        assert len({row.key for row in targets(app).rows_in_view()}) == 12
        assert targets(app).has_focus


async def select_vm(app: EscortApp, pilot, name: str) -> None:  # type: ignore[no-untyped-def]
    """Put the cursor on VM ``name`` and wait until its targets are shown (they are
    computed in a worker after a short debounce; the machine may be slow)."""
    key = next(v.uuid for v in app.all_vms() if v.name == name)
    assert isinstance(app.screen, VMsScreen)
    app.screen.focus_vm(key)
    for _ in range(200):
        await pilot.pause(0.05)
        await settle(app)
        title = str(app.screen.query_one("#targets-title").render())
        if title.startswith(f"Targets for {name}:") and "allowed" in title:
            return
    raise AssertionError(f"targets for {name} never appeared (title: {title!r}, "
                         f"cursor on {app.screen.main_table().cursor_key}, workers: {list(app.workers)})")


async def test_select_vm_lists_every_host_with_reasons_and_fixes(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        hosts = {row.key for row in targets(app).rows_in_view()}
        assert len(hosts) == 12  # every host is listed
        lines = target_lines(app)
        assert "✓ allowed fra-02" in lines
        assert "✗ refused par-02" in lines
        text = "\n".join(lines)
        assert "[cert.expired]" in text and "[cert.revoked]" in text and "[attr.country]" in text
        assert "fix:" in text
        title = str(app.screen.query_one("#targets-title").render())
        assert "pay-db-01: 1 of 12 hosts allowed" in title


async def test_vm_allowing_nothing_and_bad_policies_are_shown(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        rows = {app.vm_by_key(r.key).name: r for r in vm_table(app).rows_in_view()}  # type: ignore[union-attr]
        assert rows["res-gpu-01"].cells[4] == "0/12"
        assert rows["legacy-01"].cells[3].startswith("✗ ")  # no policy, one-line reason
        assert rows["rogue-01"].cells[3].startswith("✗ ")  # unknown owner
        await select_vm(app, pilot, "res-gpu-01")
        assert not any(line.startswith("✓") for line in target_lines(app))


async def test_walkthrough_from_target_and_escape_back(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        await pilot.press("tab")  # to the targets
        assert targets(app).has_focus
        await pilot.press("enter")  # first target: fra-02, allowed
        await pilot.pause()
        assert isinstance(app.screen, WalkthroughScreen)
        text = app.screen.query_one(DetailPane).plain
        assert "May an admin move VM pay-db-01 to host fra-02?" in text
        assert "1. " in text and "Verdict: ✓ ALLOWED" in text
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, VMsScreen)
        assert app.vm_by_key(vm_table(app).cursor_key or "").name == "pay-db-01"  # type: ignore[union-attr]


async def test_walkthrough_of_refusal_lists_reasons(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        targets(app).move_to_key("par-02")
        await pilot.press("w")
        await pilot.pause()
        text = app.screen.query_one(DetailPane).plain
        assert "Verdict: ✗ REFUSED" in text
        assert "cert.expired" in text and "attr.country" in text and "fix:" in text


async def test_readonly_hides_migrate_and_service_refuses(make_app: MakeApp) -> None:
    app = make_app(readonly=True)
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        title = str(app.screen.query_one(".title-bar").render())
        assert "READ-ONLY" in title
        assert "migrate" not in [b.binding.action for b in app.screen.active_bindings.values()
                                 if b.enabled and b.binding.show]
        await pilot.press("tab", "m")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmDialog)
        # even when called directly, the service layer refuses
        app.request_migration(vm_table(app).cursor_key or "", "fra-02")
        await pilot.pause()
        assert not isinstance(app.screen, ConfirmDialog)
        assert "read-only" in app.last_error


async def test_readonly_from_config_file(make_app: MakeApp) -> None:
    app = make_app(config=UIConfig(readonly=True))
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        assert app.readonly


async def test_migrate_confirmation_focuses_cancel(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        await pilot.press("tab", "m")  # fra-02: allowed
        await pilot.pause()
        # m opens the pre-flight checklist first (the typed confirmation follows a passing
        # pre-flight on real hosts: tests/ui/test_migration_ui.py, tests/integration)
        assert isinstance(app.screen, PreflightScreen)
        focused = app.focused
        assert isinstance(focused, Button) and focused.id == "cancel"
        assert app.screen.query_one("#go", Button).disabled
        await pilot.press("enter")  # Enter on Cancel changes nothing
        await pilot.pause()
        assert isinstance(app.screen, VMsScreen)


async def test_refused_target_cannot_be_migrated(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await select_vm(app, pilot, "pay-db-01")
        app.admin = "oncall"
        targets(app).move_to_key("par-02")
        await pilot.press("m")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, PreflightScreen)  # the checklist says why, item by item
        for _ in range(100):
            if screen.result is not None:
                break
            await pilot.pause(0.05)
        await pilot.pause()
        assert "✗ target is in the VM's allowed set — FAILED" in str(screen.query_one("#pf-checks").render())
        assert screen.query_one("#go", Button).disabled


async def test_trust_tree_shows_glyph_and_word(make_app: MakeApp) -> None:
    app = make_app(start_mode="trust")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        assert isinstance(app.screen, TrustScreen)
        tree = app.screen.query_one(Tree)
        labels: list[str] = []
        stack = list(tree.root.children)
        while stack:
            node = stack.pop()
            labels.append(str(node.label))
            stack.extend(node.children)
        assert "✓ Escort Demo Root CA  valid  CRL fresh until 2026-12-26" in labels
        assert "⚠ Americas CA  expiring in 9 days  CRL fresh until 2026-12-26" in labels
        assert "⊘ Asia-Pacific CA  revoked  CRL fresh until 2026-12-26" in labels
        assert "host ams-02  ⊘ revoked" in labels
        detail = app.screen.query_one(DetailPane).plain
        assert "CRL fresh until 2026-12-26 12:00 UTC." in detail
        for word in ("Subject", "Issuer", "Serial", "days left", "Key", "Constraints",
                     "Policies", "SHA-256"):
            assert word in detail, word
        trusting_root = sum(1 for v in VMS if v.owner and "root" in v.trust)
        assert f"Depends on it  12 hosts, {trusting_root} VMs" in detail


async def test_hosts_table_and_chain_detail(make_app: MakeApp) -> None:
    app = make_app(start_mode="hosts")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        assert isinstance(app.screen, HostsScreen)
        table = app.screen.query_one(VirtualTable)
        assert table.total_count == 12
        rows = {r.key: r.cells for r in table.rows_in_view()}
        assert rows["par-02"][4].startswith("✗") and "expired" in rows["par-02"][4]
        assert rows["fra-01"][1:4] == ("eu", "DE", "high")
        app.screen.focus_host("ams-02")
        await pilot.pause()
        detail = app.screen.query_one(DetailPane).plain
        assert "Chain: ✗ chain invalid" in detail and "cert.revoked" in detail
        assert "└ anchor: Escort Demo Root CA" in detail


async def test_palette_go_to_vm(make_app: MakeApp) -> None:
    app = make_app(start_mode="trust")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"go to vm web-05")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, VMsScreen)
        assert app.vm_by_key(vm_table(app).cursor_key or "").name == "web-05"  # type: ignore[union-attr]


async def test_keymap_from_config_remaps_bindings(make_app: MakeApp) -> None:
    app = make_app(config=UIConfig(keymap={"app.trust": "t", "screen.filter": "f"}))
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("f", "w", "e", "b")
        await pilot.pause()
        assert vm_table(app).row_count == 6
        await pilot.press("escape", "escape", "t")
        await pilot.pause()
        assert isinstance(app.screen, TrustScreen)


async def test_copy_detail_and_last_error(make_app: MakeApp) -> None:
    app = make_app(start_mode="hosts")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("c")
        await pilot.pause()
        assert app.clipboard.startswith("fra-01")
        app.notify("boom: something failed", severity="error")
        await pilot.press("C")
        await pilot.pause()
        assert app.clipboard == "boom: something failed"


async def test_help_lists_keys_with_ids(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        text = app.screen.query_one(DetailPane).plain
        assert "[app.trust]" in text and "[screen.filter]" in text
        await pilot.press("escape")
        await pilot.pause()
        assert isinstance(app.screen, VMsScreen)


async def test_bad_theme_file_notifies_once_and_falls_back(make_app: MakeApp, tmp_path: Path) -> None:
    themes = tmp_path / "themes"
    themes.mkdir()
    (themes / "broken.toml").write_text("name = 'broken'\nprimary = 'not-a-colour'\n")
    (themes / "mine.toml").write_text("name = 'mine'\nprimary = '#ff0000'\n")
    app = make_app(themes=themes, config=UIConfig(theme="broken"))
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        messages = [n.message for n in app._notifications]
        named = [m for m in messages if "broken.toml" in m]
        assert len(named) == 1
        assert app.theme == "escort-dark"
        assert "mine" in app.available_themes


async def test_missing_fleet_file_opens_with_problem(make_app: MakeApp, tmp_path: Path) -> None:
    app = make_app(tmp_path / "nope.toml")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        bar = str(app.screen.query_one(".problem-bar").render())
        assert "1 problem" in bar and "nope.toml" in bar
        await pilot.press("p")
        await pilot.pause()
        assert isinstance(app.screen, ProblemsScreen)
        assert "nope.toml" in app.screen.query_one(DetailPane).plain
        await pilot.press("1")  # the trust screen copes with no trust store
        await pilot.pause()
        assert "No certificate authority" in app.screen.query_one(DetailPane).plain


async def test_corrupt_fleet_file_opens_with_problem(make_app: MakeApp, fleet_copy: Path) -> None:
    fleet_copy.write_text("this is [not toml")
    app = make_app(fleet_copy)
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        assert "not valid TOML" in str(app.screen.query_one(".problem-bar").render())


async def test_unreadable_host_certificate_shown_on_the_host(make_app: MakeApp, fleet_copy: Path) -> None:
    cert = fleet_copy.parent / "hosts" / "fra-01.pem"
    cert.write_bytes(b"garbage, not a certificate")
    app = make_app(fleet_copy, start_mode="hosts")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        rows = {r.key: r.cells for r in app.screen.query_one(VirtualTable).rows_in_view()}
        assert rows["fra-01"][4].startswith("✗")
        detail = app.screen.query_one(DetailPane).plain
        assert "Certificate problem:" in detail and "fra-01.pem" in detail


async def test_host_cert_path_is_a_directory(make_app: MakeApp, fleet_copy: Path) -> None:
    cert = fleet_copy.parent / "hosts" / "nyc-01.pem"
    cert.unlink()
    cert.mkdir()  # a directory where the certificate file belongs
    app = make_app(fleet_copy, start_mode="hosts")
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        rows = {r.key: r.cells for r in app.screen.query_one(VirtualTable).rows_in_view()}
        assert rows["nyc-01"][4].startswith("✗")


async def test_refresh_reads_hosts_through_libvirt_test_driver(make_app: MakeApp) -> None:
    app = make_app(start_mode="hosts", live=True)
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.pause(0.2)
        await settle(app)
        await pilot.pause()
        rows = {r.key: r.cells for r in app.screen.query_one(VirtualTable).rows_in_view()}
        assert all(cells[5] == "✓ up" for cells in rows.values())
        assert sum(int(cells[6]) for cells in rows.values()) == len(VMS)


async def test_acting_as_an_admin_brings_grants_into_the_decision(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"act as admin oncall")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.admin == "oncall"
        assert "as oncall" in str(app.screen.query_one(".title-bar").render())
        await select_vm(app, pilot, "pay-db-01")  # alice granted oncall her VMs
        assert "✓ allowed fra-02" in target_lines(app)
        await select_vm(app, pilot, "web-01")  # carol's grant is for night-shift
        lines = target_lines(app)
        assert not any(line.startswith("✓") for line in lines)
        assert any("[grant." in line for line in lines)
        targets(app).move_to_key("fra-02")
        await pilot.press("w")
        await pilot.pause()
        text = app.screen.query_one(DetailPane).plain
        assert "May oncall move VM web-01 to host fra-02?" in text and "Grant" in text


async def test_problems_screen_lists_hosts_and_vm_policies(make_app: MakeApp) -> None:
    app = make_app()
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("p")
        await pilot.pause()
        text = app.screen.query_one(DetailPane).plain
        assert "no problems: the fleet file" in text
        for needle in ("par-02:", "[cert.expired]", "ams-02:", "[cert.revoked]", "legacy-01:",
                       "[policy.unsigned]", "rogue-01:", "[policy.owner_untrusted]"):
            assert needle in text, needle


async def test_problems_screen_lists_vms_driven_around_libvirt(make_app: MakeApp) -> None:
    """The problem list shows what `escort check` reports as vm.tainted (the same findings, from
    the hosts' last refresh), and says "not checked" when no host was refreshed."""
    from dataclasses import replace

    app = make_app(live=True)
    async with app.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await settle(app)
        host = next(h for h in app.service.hosts() if h.facts is not None and h.facts.domains)
        assert host.facts is not None
        first, *rest = host.facts.domains
        tainted = replace(first, taints=("tainted: custom monitor control commands issued",))
        app.service.apply_facts(host.name, replace(host.facts, domains=(tainted, *rest)), None)
        await pilot.press("p")
        await pilot.pause()
        text = app.screen.query_one(DetailPane).plain
        assert f"VM {first.name} on {host.name} is tainted in libvirt" in text, text
        assert "send the VM's memory to any QEMU" in text and "[vm.tainted]" in text
    offline = make_app()
    async with offline.run_test(size=SIZE) as pilot:
        await opened(pilot)
        await pilot.press("p")
        await pilot.pause()
        assert "not checked: no host has been refreshed" in offline.screen.query_one(DetailPane).plain
