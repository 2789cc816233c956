"""Radar: what expires when and what it breaks, soonest first (`escort check`'s expiry part).

The impact of each item is computed, not guessed: the allowed-target matrix and each VM's
placement are recomputed as of the moment after it expires (services/check.py).
"""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from textual.binding import Binding, BindingType

from console.ui.screens.base import PaneScreen
from console.ui.text import BAD, WARN
from console.ui.widgets.detail import DetailPane, IndentedLines

RADAR_DAYS = 90


class RadarScreen(PaneScreen):
    """Certificates, CRLs, policies and grants expiring within RADAR_DAYS, with impact."""

    screen_label = "Radar"
    pane_id = "radar"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="radar.back"),
    ]

    def on_mount(self) -> None:
        self.sub_title = "radar"
        self.reload()

    def reload(self) -> None:
        from console.services.check import CheckService

        out = IndentedLines()
        tones = self.escort.tones()
        out.add(0, (f"Radar: what expires within {RADAR_DAYS} days, and what breaks then", "bold"))
        out.blank()
        service = self.escort.service
        if getattr(service, "spec", None) is None or not hasattr(service, "matrix"):
            out.add(2, "no fleet loaded (press p for problems)")
        else:
            now = service.at if isinstance(service.at, dt.datetime) else dt.datetime.now(dt.UTC)
            findings = CheckService(service, days=RADAR_DAYS, offline=True).expiring(now)  # type: ignore[arg-type]
            if not findings:
                out.add(2, f"nothing expires within {RADAR_DAYS} days.")
            for f in findings:
                when = f.when.strftime("%Y-%m-%d") if f.when else "?"
                glyph, tone = (BAD, tones["bad"]) if f.severity == "error" else (WARN, tones["warn"])
                out.add(0, (f"{glyph} {when}", tone), (f"  {f.code}", "bold"))
                out.add(4, f.message)
                if f.fix:
                    out.add(6, (f"fix: {f.fix}", "dim"))
                out.blank()
        pane = self.query_one(DetailPane)
        pane.show(out.renderable(), out.plain())
        pane.focus()
