"""Walkthrough: one (VM, host) decision told step by step, for teaching and for 3 a.m.

owner's policy → trusted CA → intermediate → host certificate → attributes → grant →
verdict. Each step says what was checked, whether it passed, and for a failure why and
how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rich.console import Group
from rich.text import Text
from textual.binding import Binding, BindingType

from console.core.reasons import Reason
from console.ui.screens.base import PaneScreen
from console.ui.text import BAD, OK, WARN
from console.ui.widgets.detail import DetailPane, IndentedLines


def _step_fields(step: Any) -> tuple[str, bool | None, str, list[Reason]]:
    """Read a decisions.Step (title/ok/detail/reasons) defensively: the walkthrough must
    render whatever the core adds without crashing an operator's console."""
    title = str(getattr(step, "title", "") or getattr(step, "name", "") or step)
    ok = getattr(step, "ok", None)
    if ok is None:
        ok = getattr(step, "passed", None)
    detail = str(getattr(step, "detail", "") or getattr(step, "explanation", "") or "")
    reasons = list(getattr(step, "reasons", ()) or ())
    return title, ok if isinstance(ok, bool) else None, detail, reasons


def render_walkthrough(vm_name: str, host: str, decision: Any, admin: str | None,
                       tones: Mapping[str, str]) -> tuple[Group, str]:
    """The Decision as numbered, plain-language steps -> (renderable, plain text to copy).

    ``tones`` maps ok/bad to Rich styles of the current theme; glyphs and words carry
    the meaning on their own.
    """
    out = IndentedLines()
    out.add(0, (f"May {admin or 'an admin'} move VM {vm_name} to host {host}?", "bold"))
    out.blank()
    steps = list(getattr(decision, "steps", ()) or ())
    for n, step in enumerate(steps, 1):
        title, ok, detail, reasons = _step_fields(step)
        if ok is None:
            glyph, word, style = "·", "note", "dim"
        elif ok:
            glyph, word, style = OK, "passed", tones["ok"]
        else:
            glyph, word, style = BAD, "failed", tones["bad"]
        out.add(0, (f"{n}. ", "bold"), (f"{glyph} {word}", style), (f"  {title}", "bold"))
        shown = set()
        for line in detail.splitlines():
            out.add(5, line)
            shown.add(line.strip())
        for reason in reasons:
            mark = WARN if reason.severity == "warning" else BAD
            message = "" if reason.message.strip() in shown else f" {reason.message}"
            out.add(5, f"{mark}{message} [{reason.code}]")
            if reason.fix:
                out.add(7, (f"fix: {reason.fix}", "dim"))
        out.blank()
    if not steps:
        out.add(0, ("(the trust core gave no step-by-step record for this decision)", "dim"))
        out.blank()
    if decision.allowed:
        out.add(0, (f"Verdict: {OK} ALLOWED", "bold " + tones["ok"]), " — every check above passed.")
    else:
        n = len(decision.reasons)
        out.add(0, (f"Verdict: {BAD} REFUSED", "bold " + tones["bad"]),
                f" — {n} check{'s' if n != 1 else ''} failed:")
        for reason in decision.reasons:
            out.add(2, f"• {reason.message} [{reason.code}]")
            if reason.fix:
                out.add(4, (f"fix: {reason.fix}", "dim"))
    return out.renderable(), out.plain()


class WalkthroughScreen(PaneScreen):
    screen_label = "Walkthrough"
    pane_id = "walkthrough"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="walkthrough.back"),
    ]

    def __init__(self, vm_key: str, host: str) -> None:
        super().__init__()
        self.vm_key = vm_key
        self.host = host

    def on_mount(self) -> None:
        self.reload()

    def reload(self) -> None:
        vm = self.escort.vm_by_key(self.vm_key)
        name = vm.name if vm is not None else self.vm_key
        self.sub_title = f"walkthrough: {name} → {self.host}"
        decision = self.escort.service.explain(self.vm_key, self.host, self.escort.admin)
        pane = self.query_one(DetailPane)
        body, plain = render_walkthrough(name, self.host, decision, self.escort.admin,
                                         self.escort.tones())
        placed = self.escort.misplaced.get(vm.uuid) if vm is not None else None
        if placed is not None and not placed.unchecked:
            # the 3 a.m. case: say first that the VM is where it must not be, and which checks fail
            codes = ", ".join(r.code for r in placed.reasons)
            note = (f"{BAD} {name} RUNS ON {placed.host}, WHICH ITS POLICY REFUSES — failing check(s): "
                    f"{codes}")
            body = Group(Text(note, style="bold " + self.escort.tones()["bad"]), Text(""), body)
            plain = note + "\n\n" + plain
        pane.show(body, plain)
        pane.focus()
