"""Smaller screens: help and problems (the Migrations tab is in screens/migrations.py)."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType

from console.core.check import tainted_findings
from console.ui.screens.base import PaneScreen
from console.ui.text import BAD
from console.ui.widgets.detail import DetailPane, IndentedLines


class HelpScreen(PaneScreen):
    """Keys as currently mapped (the keymap in config.toml changes them)."""

    screen_label = "Help"
    pane_id = "help"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="help.back"),
    ]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def on_mount(self) -> None:
        self.sub_title = "help"
        pane = self.query_one(DetailPane)
        pane.show(self.text)
        pane.focus()


class ProblemsScreen(PaneScreen):
    """Every problem found while loading, each with where it belongs and one-line why."""

    screen_label = "Problems"
    pane_id = "problems"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back", id="problems.back"),
    ]

    def on_mount(self) -> None:
        self.sub_title = "problems"
        problems = self.escort.all_problems()
        bad = self.escort.tones()["bad"]
        out = IndentedLines()

        def section(title: str, items: list[str], empty: str) -> None:
            out.add(0, (title, "bold"))
            if not items:
                out.add(2, empty)
            for line in items:
                out.add(2, (f"{BAD} ", bad), line)
            out.blank()

        section("Loading the fleet", problems,
                "no problems: the fleet file, trust directories and grants loaded.")
        hosts: list[str] = []
        for h in self.escort.all_hosts():
            reasons = [r for r in (h.problem, h.cert_problem) if r is not None]
            if h.chain is not None and not h.chain.valid:
                reasons += list(h.chain.reasons)
            hosts += [f"{h.name}: {r.message} [{r.code}]" for r in reasons]
        for name, st in sorted(self.escort.guard_states.items()):
            if st.state in ("missing", "broken", "stale"):
                hosts.append(f"{name}: escort guard {st.state}: "
                             f"{st.problem or 'plain virsh can move any VM here'} [guard.{st.state}]")
        section("Hosts (details on the Hosts screen)", hosts, "none")
        placed = [f"{p.label} runs on {p.host}, which its policy refuses: "
                  f"{'; '.join(r.message for r in p.reasons)} [{', '.join(r.code for r in p.reasons)}]"
                  for p in self.escort.misplaced.values() if not p.unchecked]
        section("Placement (VMs running where their policy refuses them)", placed,
                "none: every VM runs on a host its policy admits")
        refreshed = [(h.name, h.facts.domains) for h in self.escort.all_hosts() if h.facts is not None]
        tainted = [f"{f.message} [{f.code}]" for f in tainted_findings(refreshed)]
        section("VMs driven around libvirt (as escort check's vm.tainted)", tainted,
                "none in the hosts' last refresh" if refreshed else
                "not checked: no host has been refreshed (offline)")
        vms = [f"{v.name}: {v.policy_problems[0].message} [{v.policy_problems[0].code}]"
               for v in self.escort.all_vms() if v.policy_problems]
        if len(vms) > 200:
            vms = [*vms[:200], f"… and {len(vms) - 200} more (filter the VMs screen by ✗)"]
        section("VM policies (details on the VMs screen)", vms, "none")
        pane = self.query_one(DetailPane)
        pane.show(out.renderable(), out.plain())
        pane.focus()
