"""Walkthrough: one (VM, host) decision told step by step, for teaching and for 3 a.m.

owner's policy → trusted CA → intermediate → host certificate → attributes → grant →
verdict. Each step says what was checked, whether it passed, and for a failure why and
how to fix it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType

from console.core.reasons import Reason
from console.ui.screens.base import FleetScreen
from console.ui.text import BAD, OK, WARN
from console.ui.widgets.detail import DetailPane


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
                       tones: Mapping[str, str]) -> Text:
    """The Decision as numbered, plain-language steps (``tones``: ok/bad -> Rich style)."""
    out = Text()
    out.append(f"May {admin or 'an admin'} move VM {vm_name} to host {host}?\n\n", style="bold")
    steps = list(getattr(decision, "steps", ()) or ())
    for n, step in enumerate(steps, 1):
        title, ok, detail, reasons = _step_fields(step)
        glyph, word, style = ((OK, "passed", tones["ok"]) if ok else (BAD, "failed", tones["bad"])) \
            if ok is not None else ("·", "info", "dim")
        out.append(f"{n}. ", style="bold")
        out.append(f"{glyph} {word}", style=style)
        out.append(f"  {title}\n", style="bold")
        for line in detail.splitlines():
            out.append(f"     {line}\n")
        for reason in reasons:
            mark = WARN if reason.severity == "warning" else BAD
            out.append(f"     {mark} {reason.message} [{reason.code}]\n")
            if reason.fix:
                out.append(f"       fix: {reason.fix}\n", style="dim")
        out.append("\n")
    if not steps:
        out.append("(the trust core gave no step-by-step record for this decision)\n\n", style="dim")
    if decision.allowed:
        out.append(f"Verdict: {OK} ALLOWED", style="bold " + tones["ok"])
        out.append(" — every check above passed.\n")
    else:
        out.append(f"Verdict: {BAD} REFUSED", style="bold " + tones["bad"])
        n = len(decision.reasons)
        out.append(f" — {n} check{'s' if n != 1 else ''} failed:\n")
        for reason in decision.reasons:
            out.append(f"  • {reason.message} [{reason.code}]\n")
            if reason.fix:
                out.append(f"    fix: {reason.fix}\n", style="dim")
    return out


class WalkthroughScreen(FleetScreen):
    screen_label = "Walkthrough"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="walkthrough.back"),
    ]

    def __init__(self, vm_key: str, host: str) -> None:
        super().__init__()
        self.vm_key = vm_key
        self.host = host

    def compose(self) -> ComposeResult:
        yield from self.compose_top()
        yield DetailPane(id="walkthrough")
        yield from self.compose_bottom()

    def on_mount(self) -> None:
        vm = self.escort.vm_by_key(self.vm_key)
        name = vm.name if vm is not None else self.vm_key
        self.sub_title = f"walkthrough: {name} → {self.host}"
        decision = self.escort.service.explain(self.vm_key, self.host, self.escort.admin)
        pane = self.query_one(DetailPane)
        pane.show(render_walkthrough(name, self.host, decision, self.escort.admin,
                                      self.escort.tones()))
        pane.focus()

    def action_back(self) -> None:
        self.dismiss()

    @property
    def is_modal_like(self) -> bool:
        return True
