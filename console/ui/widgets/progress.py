"""A live migration's panel: phase, bytes, rates with a sparkline, ETA, downtime, outcome.

The panel only renders what it is given (``core.migration.Progress`` and, at the end,
the service's ``Outcome``); the screen decides how often (latest state only, at most
a few times a second). ``ProgressBar(total=None)`` is indeterminate until libvirt
knows the total — virt-manager's rule: never a made-up percentage.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Label, ProgressBar, Sparkline, Static

from console.core.migration import TERMINAL, Outcome, Progress
from console.ui.text import BAD, OK

PHASE_WORDS = {
    "preflight": "pre-flight",
    "starting": "starting",
    "copying": "copying memory",
    "converging": "converging (re-sending dirtied pages)",
    "switchover": "switch-over (VM paused briefly)",
    "verifying": "verifying where the VM runs",
    "completed": "completed",
    "failed": "failed",
    "aborted": "aborted",
}


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'; None -> '?' (unknown is said, not guessed)."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(s), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_lines(p: Progress) -> list[str]:
    """The panel's text lines (also what ``c`` copies): one fact per line, 80-column safe."""
    done = "" if p.fraction is None else f" ({p.fraction * 100:.0f}% of this pass)"
    lines = [
        f"Data     {human_bytes(p.data_processed)} sent of {human_bytes(p.data_total)}, "
        f"{human_bytes(p.data_remaining)} remaining{done}",
        f"Rate     {human_bytes(p.rate_bps)}/s   dirty {human_bytes(p.dirty_rate_bps)}/s   "
        f"pass {p.iteration or '-'}",
        f"Time     {human_seconds(p.elapsed_s)} elapsed   ETA "
        + ("-" if p.phase in TERMINAL else human_seconds(p.eta_s)),
    ]
    if p.downtime_ms is not None:
        lines.append(f"Downtime {p.downtime_ms} ms (the VM was paused for switch-over)")
    return lines


def outcome_line(outcome: Outcome, source: str, target: str) -> tuple[str, bool]:
    """What happened and where the VM runs now, as checked by the service (not assumed)."""
    if outcome.result == "success":
        where = outcome.vm_on or target
        text = f"{OK} MOVED: verified running on {where} only (gone from {source})"
        return text, True
    where = (f"still running on {outcome.vm_on} (checked)" if outcome.vm_on
             else "NOT verified on any host — press s to scan for half-done migrations")
    text = f"{BAD} {outcome.result.upper()}: {outcome.message or outcome.result}; {where}"
    if outcome.hosts:  # what each host answered, or why it could not be asked
        text += "".join(f"\n  {h.describe()}" for h in outcome.hosts)
    return text, False


class MigrationPanel(Vertical, can_focus=True):
    """One migration. Focusable: ``a`` on the Migrations screen aborts the focused one."""

    DEFAULT_CSS = """
    MigrationPanel {
        height: auto; border: round $primary; padding: 0 1; margin-bottom: 1;
    }
    MigrationPanel:focus { border: double $accent; }
    MigrationPanel .mp-title { text-style: bold; }
    MigrationPanel Horizontal { height: 1; }
    MigrationPanel ProgressBar { width: 1fr; }
    MigrationPanel Sparkline { height: 1; width: 1fr; margin-left: 1; }
    MigrationPanel .mp-outcome { text-style: bold; }
    MigrationPanel .mp-outcome.-ok { color: $success; }
    MigrationPanel .mp-outcome.-bad { color: $error; }
    """

    def __init__(self, run_id: str, vm: str, source: str, target: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.run_id = run_id
        self.vm = vm
        self.source = source
        self.target = target
        self.progress: Progress | None = None
        self.outcome: Outcome | None = None

    def compose(self) -> ComposeResult:
        yield Label(f"{self.vm}: {self.source} → {self.target}", classes="mp-title")
        yield Label("phase: starting", classes="mp-phase")
        with Horizontal():
            yield ProgressBar(total=None, show_eta=False, classes="mp-bar")
            yield Sparkline([0.0], summary_function=max, classes="mp-spark")
        yield Static("", classes="mp-stats", markup=False)
        yield Static("", classes="mp-outcome", markup=False)

    def show(self, progress: Progress, outcome: Outcome | None = None) -> None:
        """Render the latest state (cheap: a handful of widget updates)."""
        self.progress = progress
        self.outcome = outcome or self.outcome
        phase = PHASE_WORDS.get(progress.phase, progress.phase)
        msg = f" — {progress.message}" if progress.message and progress.phase not in TERMINAL else ""
        self.query_one(".mp-phase", Label).update(f"phase: {phase}{msg}")
        bar = self.query_one(".mp-bar", ProgressBar)
        if progress.phase == "completed":
            bar.update(total=100, progress=100)
        elif progress.fraction is not None:
            bar.update(total=100, progress=progress.fraction * 100)
        else:
            bar.update(total=None)  # indeterminate until libvirt knows the total
        history = list(progress.rate_history)
        spark = self.query_one(".mp-spark", Sparkline)
        # a flat line of zeros draws as a full block: show the rate only once it has a shape
        spark.display = len(history) >= 2 and max(history) > 0
        spark.data = history or [0.0]
        self.query_one(".mp-stats", Static).update("\n".join(progress_lines(progress)))
        box = self.query_one(".mp-outcome", Static)
        if self.outcome is not None:
            text, good = outcome_line(self.outcome, self.source, self.target)
            box.update(text)
            box.set_class(good, "-ok")
            box.set_class(not good, "-bad")
        elif progress.phase in TERMINAL:
            box.update(f"{progress.phase}: {progress.message}")

    @property
    def finished(self) -> bool:
        return self.outcome is not None or (self.progress is not None and self.progress.phase in TERMINAL)

    def plain(self) -> str:
        lines = [f"{self.vm}: {self.source} -> {self.target}"]
        if self.progress is not None:
            lines.append(f"phase: {self.progress.phase}")
            lines += progress_lines(self.progress)
        if self.outcome is not None:
            lines.append(outcome_line(self.outcome, self.source, self.target)[0])
        return "\n".join(lines)
