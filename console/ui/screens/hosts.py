"""Hosts: one row per host, the detail pane shows the certificate chain and problems."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import Input

from console.ui.screens.base import FleetScreen
from console.ui.widgets.detail import DetailPane
from console.ui.widgets.vtable import Column, Row, VirtualTable


class HostsScreen(FleetScreen):
    screen_label = "Hosts"
    has_filter = True
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("e", "evacuate", "Evacuate", id="hosts.evacuate"),
    ]
    COLUMNS = (
        Column("Host", 12, flex=True),
        Column("Region", 8),
        Column("C", 2),
        Column("Assur.", 6),
        Column("Cert expiry", 18),
        Column("Reach", 9),
        Column("VMs", 4),
        Column("Guard", 6),
    )

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        with Vertical(classes="split"):
            with Vertical(classes="main"):
                yield Input(placeholder="filter hosts (Enter keeps it, Esc clears)", id="filter",
                            classes="filter")
                yield VirtualTable(self.COLUMNS, id="hosts-table", empty_text="no host matches",
                                   no_rows_text="no hosts in this fleet (press p for problems)")
            yield DetailPane(id="detail")
        yield from self.compose_bottom()

    def on_mount(self) -> None:
        self.query_one("#filter").display = False
        self.reload()
        self.query_one("#hosts-table", VirtualTable).focus()

    def reload(self) -> None:
        table = self.query_one("#hosts-table", VirtualTable)
        table.set_rows(self.escort.host_rows())
        self._show(table.cursor_key)

    def on_virtual_table_highlighted(self, event: VirtualTable.Highlighted) -> None:
        self._show(event.key)

    def _show(self, key: str | None) -> None:
        pane = self.query_one(DetailPane)
        if key is None:
            pane.show("No host selected.")
            return
        self.escort.show_host_detail(pane, key)

    def on_virtual_table_chosen(self, event: VirtualTable.Chosen) -> None:
        self.query_one(DetailPane).focus()

    def action_evacuate(self) -> None:
        """Plan moving every VM off the selected host (screens/evacuation.py)."""
        key = self.query_one("#hosts-table", VirtualTable).cursor_key
        if key is None:
            self.notify("Select a host first.", timeout=3)
            return
        self.escort.request_evacuation([key])

    def focus_host(self, name: str) -> bool:
        return self.query_one("#hosts-table", VirtualTable).move_to_key(name)


__all__ = ["HostsScreen", "Row"]
