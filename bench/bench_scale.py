"""Scale benchmark: what an operator waits for, from process start, in a real terminal.

Run:  python bench/bench_scale.py [--sizes 100x10,10000x1000] [--runs 3] [--record]

For each size the fleet is generated with the project's own tool
(``escort demo --vms N --hosts M --print-path``: CA tree with CRLs, host certificate
files, ES256 owner-signed policy files, the documented ``[[vms]]`` layout; offline)
and then, in tmux at 80x24 (a private tmux server, nothing shared):

* **launch -> first VM rows**: from just before ``tmux new-session`` starts
  ``escort --offline --fleet F`` until ``tmux capture-pane`` shows a VM row (polled
  every ~5 ms; each poll is a ``tmux`` process, so figures are +-10 ms). Includes the
  interpreter start, imports, reading and checking the fleet, building rows, Textual's
  start-up and first paint. One unmeasured launch first warms the page cache.
* **every verdict (the whole fleet)**: until the title bar's progress ("checking 3,412 of
  10,000 VMs", shown from the first paint) has gone, i.e. the console has handed the last of
  the fleet's verdicts to the screen; from launch and from the first rows. The count's
  "of M" must be the fleet's size (checked; a failed or incomplete check is an error, not
  a figure). Measured once with an empty cache (``ESCORT_CACHE_DIR``, a directory of the
  benchmark's own: no snapshot, no opened policies; that launch fills it, and the benchmark
  waits until it has written its snapshot before stopping it) and ``--runs`` times warm
  (the whole-fleet snapshot answers). Judged: matrix cold <= 2 s on the whole launch
  (stricter than the matrix alone); matrix warm <= 0.5 s from the first rows on screen to
  the fleet's last verdict (the launch before it is judged by the first-rows goal).
* **breakdown, verdicts of the rows on screen**: until no row on screen (~12 at 80x24)
  says "checking" -- what this benchmark called "every verdict" before main b6af7a5
  (2026-11-28 02:53 UTC). The console decides the rows on screen first, so this comes earlier than the
  whole fleet; no goal is judged on it (the goals are about the whole matrix).
* **Down -> target list**: Down arrow until the targets pane's title names the next
  VM with its "N of M hosts allowed" (every host is listed with its verdict then), and
  until the title ends in "Enter: walkthrough" (every refused host's reasons and fixes
  listed too); the same row's ``N/M`` must agree with the title (checked, reported).
* **filter keystroke**: with ``/`` and all but the last character of a VM name typed,
  the last key until the table shows exactly that VM.
* ``escort explain --offline`` for one pair and ``escort targets --offline`` for one VM:
  wall time of the whole process (median of ``--runs`` x 2).

Every size runs in the same invocation, so the ratios to the smallest size are
comparable; absolute times depend on the shared machine (load average printed).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.machine import describe, record  # noqa: E402

ESCORT = str(Path(sys.executable).with_name("escort"))
ROW = re.compile(r"^(vm-\d+)\s.*?\s(\S+)\s*$")
TITLE = re.compile(r"Targets for (vm-\d+): ([\d,]+) of ([\d,]+) hosts? allowed")
#: the console's title bar while its start-up check runs (console/ui/app.py ``check_words``)
PROGRESS = re.compile(r"checking ([\d,]+) of ([\d,]+) VMs")
STOPPED = re.compile(r"check FAILED at|only [\d,]+ of [\d,]+ VMs checked")
SECTION = "## bench_scale.py — from process start in tmux at 80x24: 100 VMs vs 10,000 VMs"


@dataclass
class SizeResult:
    vms: int
    hosts: int
    first_rows: list[float] = field(default_factory=list)
    verdicts: list[float] = field(default_factory=list)
    first_rows_cold: list[float] = field(default_factory=list)
    verdicts_cold: list[float] = field(default_factory=list)
    #: per launch: from the first VM rows on screen until every verdict is (the matrix part)
    after_rows: list[float] = field(default_factory=list)
    after_rows_cold: list[float] = field(default_factory=list)
    #: breakdown: until no row ON SCREEN says "checking" (from launch / from the first rows)
    visible: list[float] = field(default_factory=list)
    visible_cold: list[float] = field(default_factory=list)
    visible_after_rows: list[float] = field(default_factory=list)
    visible_after_rows_cold: list[float] = field(default_factory=list)
    #: the largest "of M" the title's progress showed (must be the fleet's size)
    progress_total: int = 0
    progress_seen: int = 0
    down: list[float] = field(default_factory=list)
    down_full: list[float] = field(default_factory=list)
    filter_key: list[float] = field(default_factory=list)
    explain: list[float] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    disagreements: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Term:
    """One tmux server of our own (``-L``), one 80x24 session."""

    count = 0

    def __init__(self, name: str) -> None:
        Term.count += 1
        self.sock = f"escort-bench-{os.getpid()}-{name}-{Term.count}"

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.sock, *args], check=False, capture_output=True,
                              text=True).stdout

    def start(self, command: str) -> float:
        t0 = time.perf_counter()
        subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", "new-session", "-d", "-s", "b",
                        "-x", "80", "-y", "24", command], check=True)
        return t0

    def screen(self) -> list[str]:
        return self.tmux("capture-pane", "-p", "-t", "b").splitlines()

    def keys(self, *keys: str, literal: bool = False) -> float:
        t0 = time.perf_counter()
        self.tmux("send-keys", "-t", "b", *(["-l"] if literal else []), *keys)
        return t0

    def wait(self, ready: object, timeout: float = 120.0) -> tuple[float, list[str]]:
        end = time.perf_counter() + timeout
        while True:
            lines = self.screen()
            now = time.perf_counter()
            if ready(lines):  # type: ignore[operator]
                return now, lines
            if now > end:
                raise TimeoutError("screen never showed what was waited for:\n" + "\n".join(lines))
            time.sleep(0.005)

    def stop(self) -> None:
        self.tmux("kill-server")


def vm_rows(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = ROW.match(line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def title(lines: list[str]) -> tuple[str, int, int] | None:
    for line in lines:
        m = TITLE.search(line)
        if m:
            return m.group(1), int(m.group(2).replace(",", "")), int(m.group(3).replace(",", ""))
    return None


def progress(lines: list[str]) -> tuple[int, int] | None:
    """The title bar's "checking N of M VMs" (the first line), or None when it shows none."""
    m = PROGRESS.search(lines[0]) if lines else None
    return (int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))) if m else None


def generate(vms: int, hosts: int, where: Path, regenerate: bool) -> Path:
    args = [ESCORT, "demo", "--vms", str(vms), "--hosts", str(hosts), "--dir", str(where), "--print-path"]
    if regenerate:
        args.append("--regenerate")
    t0 = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if took > 1:
        print(f"  generated {vms:,} x {hosts:,} in {took:.1f} s (setup, not measured)", flush=True)
    return Path(out.stdout.strip().splitlines()[-1])


def snapshot_written(since: float, timeout: float = 120.0) -> None:
    """Wait until the console has written its fleet snapshot (a file in our cache dir newer
    than ``since``, wall clock): a launch stopped before that leaves the next launch
    nothing to reuse, and that launch would be timed as warm while it checks everything."""
    cache = Path(os.environ["ESCORT_CACHE_DIR"])
    end = time.time() + timeout
    while time.time() < end:
        if any(p.stat().st_mtime >= since for p in cache.glob("fleet-*.snapshot")):
            return
        time.sleep(0.05)
    raise TimeoutError(f"the console wrote no snapshot in {cache} within {timeout:.0f} s")


def console_run(fleet: Path, res: SizeResult, *, interact: bool, env_cmd: str = "",
                wait_snapshot: bool = False) -> None:
    term = Term(f"{res.vms}")
    try:
        wall0 = time.time()
        t0 = term.start(f"{env_cmd}{ESCORT} --offline --fleet {fleet}")
        t1, lines = term.wait(lambda ls: bool(vm_rows(ls)))
        res.first_rows.append(t1 - t0)
        # one poll for both: the rows on screen (a breakdown) and the whole fleet (the title's
        # progress gone: the console has handed every VM's verdict to the screen)
        seen: dict[str, float] = {}

        def done(ls: list[str]) -> bool:
            rows = vm_rows(ls)
            if not rows or not ls[0].lstrip().startswith("escort"):
                return False  # a screen being redrawn
            if STOPPED.search(ls[0]):
                raise RuntimeError("the console's start-up check stopped: " + ls[0].strip())
            at = time.perf_counter()
            if "visible" not in seen and not any(v.startswith("check") for v in rows.values()):
                seen["visible"] = at
            shown = progress(ls)
            if shown is not None:
                res.progress_seen += 1
                res.progress_total = max(res.progress_total, shown[1])
            elif "fleet" not in seen:
                seen["fleet"] = at
            return "visible" in seen and "fleet" in seen

        _, lines = term.wait(done)
        if any(v.startswith("check") for v in vm_rows(lines).values()):
            raise RuntimeError("the title says every verdict is in while a row on screen says "
                               "checking:\n" + "\n".join(lines))
        res.verdicts.append(seen["fleet"] - t0)
        res.after_rows.append(seen["fleet"] - t1)
        res.visible.append(seen["visible"] - t0)
        res.visible_after_rows.append(seen["visible"] - t1)
        if wait_snapshot:
            snapshot_written(wall0)  # (after the timing: the next launch must find it)
        if not interact:
            return
        # the first VM's target list, then Down a few times
        _, lines = term.wait(lambda ls: title(ls) is not None)
        for _ in range(5):
            current = title(lines)
            assert current is not None
            names = list(vm_rows(lines))
            following = names[names.index(current[0]) + 1] if current[0] in names[:-1] else None
            if following is None:
                break
            t_key = term.keys("Down")
            t_done, lines = term.wait(lambda ls, f=following: (title(ls) or ("",))[0] == f)
            res.down.append(t_done - t_key)
            t_full, lines = term.wait(lambda ls, f=following: (title(ls) or ("",))[0] == f and any(
                "Enter: walkthrough" in ln for ln in ls))
            res.down_full.append(t_full - t_key)
            shown = title(lines)
            row = vm_rows(lines).get(following, "")
            if shown is not None and row and row != f"{shown[1]}/{shown[2]}":
                res.disagreements.append(f"{following}: row {row!r}, pane {shown[1]} of {shown[2]}")
        # filter: type all but the last key of the last VM's name, then time the last key
        target = f"vm-{res.vms - 1:0{max(4, len(str(res.vms)))}d}"
        term.keys("/")
        time.sleep(0.3)
        term.keys(target[:-1], literal=True)
        term.wait(lambda ls: len(vm_rows(ls)) > 1 and all(n.startswith(target[:-1]) for n in vm_rows(ls)))
        time.sleep(0.5)
        t_key = term.keys(target[-1], literal=True)
        t_done, _ = term.wait(lambda ls: list(vm_rows(ls)) == [target])
        res.filter_key.append(t_done - t_key)
    finally:
        term.stop()


def cli_run(args: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run([ESCORT, *args], check=False, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if out.returncode not in (0, 1):
        raise RuntimeError(f"escort {' '.join(args)}: exit {out.returncode}: {out.stderr.strip()}")
    return took


def measure(vms: int, hosts: int, runs: int, where: Path, regenerate: bool,
            cli_only: bool = False) -> SizeResult:
    res = SizeResult(vms, hosts)
    fleet = generate(vms, hosts, where / f"scale-{vms}x{hosts}", regenerate)
    width, hwidth = max(4, len(str(vms))), max(4, len(str(hosts)))
    vm, host = f"vm-{vms // 2:0{width}d}", f"hv-{hosts // 3:0{hwidth}d}"
    cache = where / f"cache-{vms}x{hosts}"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["ESCORT_CACHE_DIR"] = str(cache)  # the console's cache of opened policies, ours alone
    cli_run(["explain", "--offline", "--fleet", str(fleet), vm, host])  # warm the page cache
    if cli_only:
        # what a console launch leaves behind that a one-pair answer reads: the memory of
        # every policy seen (adapters/state.py; ~3.6 MB at 10,000 VMs)
        subprocess.run([sys.executable, "-c", "import sys; from console.services.fleet import FleetService; "
                        "FleetService.load(sys.argv[1]).vms()", str(fleet)], check=True)
        for _ in range(2 * runs):
            res.explain.append(cli_run(["explain", "--offline", "--fleet", str(fleet), vm, host]))
            res.targets.append(cli_run(["targets", "--offline", "--fleet", str(fleet), vm]))
        return res
    console_run(fleet, SizeResult(vms, hosts), interact=False, env_cmd="ESCORT_NO_CACHE=1 ")  # not counted
    cold = SizeResult(vms, hosts)
    console_run(fleet, cold, interact=False, wait_snapshot=True)  # empty cache: filled by this launch
    res.first_rows_cold, res.verdicts_cold = cold.first_rows, cold.verdicts
    res.after_rows_cold = cold.after_rows
    res.visible_cold, res.visible_after_rows_cold = cold.visible, cold.visible_after_rows
    res.progress_total, res.progress_seen = cold.progress_total, cold.progress_seen
    for i in range(runs):
        console_run(fleet, res, interact=i == 0)
    for _ in range(2 * runs):
        res.explain.append(cli_run(["explain", "--offline", "--fleet", str(fleet), vm, host]))
        res.targets.append(cli_run(["targets", "--offline", "--fleet", str(fleet), vm]))
    return res


def ms(values: list[float]) -> str:
    if not values:
        return "—"
    med = statistics.median(values) * 1000
    spread = f" ({min(values) * 1000:,.0f}–{max(values) * 1000:,.0f})" if len(values) > 1 else ""
    return f"{med:,.0f} ms{spread}"


GOALS = {  # measurement -> (goal in seconds for the biggest size, text)
    "first_rows_cold": (1.5, "≤ 1.5 s and ≤ 1.5x the smallest size"),
    "verdicts_cold": (2.0, "≤ 2 s (matrix cold: the whole fleet, judged from launch)"),
    "after_rows_cold": (None, "— (part of the line above)"),
    "visible_cold": (None, "— (breakdown: not the whole fleet, not judged)"),
    "first_rows": (1.5, "≤ 1.5 s and ≤ 1.5x the smallest size"),
    "verdicts": (None, "— (launch + rows + matrix; the warm goal is judged below)"),
    "after_rows": (0.5, "≤ 0.5 s (matrix warm: first rows -> the fleet's last verdict)"),
    "visible_after_rows": (None, "— (breakdown: not the whole fleet, not judged)"),
    "down": (0.1, "≤ 100 ms"),
    "down_full": (None, "—"),
    "filter_key": (0.1, "≤ 100 ms"),
    "explain": (0.5, "≤ 0.5 s"),
    "targets": (None, "lean (no number in the issue)"),
}
LABELS = {
    "first_rows_cold": "launch -> first VM rows painted (empty cache)",
    "verdicts_cold": "launch -> every verdict of the fleet (title: check done; empty cache)",
    "after_rows_cold": "first VM rows -> every verdict of the fleet (empty cache)",
    "visible_cold": "breakdown: launch -> verdicts of the rows on screen (empty cache)",
    "first_rows": "launch -> first VM rows painted (warm cache)",
    "verdicts": "launch -> every verdict of the fleet (title: check done; warm cache)",
    "after_rows": "first VM rows -> every verdict of the fleet (warm cache)",
    "visible_after_rows": "breakdown: first VM rows -> verdicts of the rows on screen (warm cache)",
    "down": "Down -> next VM: every host's verdict listed",
    "down_full": "Down -> next VM: every refusal's reasons listed",
    "filter_key": "filter keystroke -> table narrowed",
    "explain": "`escort explain --offline` one pair (process)",
    "targets": "`escort targets --offline` one VM (process)",
}


def report(results: list[SizeResult], runs: int) -> str:
    base, big = results[0], results[-1]
    head = "| measurement (median, min–max) | " + " | ".join(
        f"{r.vms:,} VMs x {r.hosts:,} hosts" for r in results) + " | ratio | goal | met? |"
    lines = [head, "|" + "---|" * (len(results) + 4)]
    for key, label in LABELS.items():
        cells = [ms(getattr(r, key)) for r in results]
        b, g = getattr(base, key), getattr(big, key)
        ratio = f"{statistics.median(g) / statistics.median(b):.1f}x" if b and g else "—"
        goal, text = GOALS[key]
        if goal is None or not g:
            met = "—"
        else:
            ok = statistics.median(g) <= goal
            if key.startswith("first_rows") and b:
                ok = ok and statistics.median(g) <= 1.5 * statistics.median(b)
            met = "**yes**" if ok else "**no**"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} | {text} | {met} |")
    notes = []
    for r in results:
        if not r.first_rows:
            continue  # --cli-only: no console was launched
        if r.progress_total != r.vms:
            notes.append(f"- {r.vms:,} VMs: the title's progress said \"of {r.progress_total:,}\", "
                         "not the fleet's size (or it was never seen)")
        else:
            notes.append(f"- {r.vms:,} VMs: the title's \"checking N of {r.vms:,} VMs\" seen in "
                         f"{r.progress_seen:,} polls over all launches before it cleared.")
        if r.disagreements:
            notes.append(f"- {r.vms:,} VMs: row and targets pane DISAGREE: " + "; ".join(r.disagreements[:3]))
        else:
            notes.append(f"- {r.vms:,} VMs: the row's N/M and the targets pane's \"N of M\" agreed "
                         f"for every VM moved to ({len(r.down)}).")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return "\n".join([
        f"#### {' vs '.join(f'{r.vms:,} x {r.hosts:,}' for r in results)}, {runs} launch(es) each ({when})",
        "",
        f"Machine: {describe()}.",
        "Fleets generated by `escort demo --vms N --hosts M` (offline; setup not timed); "
        "`escort --offline --fleet F` in tmux 80x24; ratio = largest / smallest size, same run. "
        "\"Every verdict of the fleet\": the title's \"checking N of M VMs\" has gone (all M "
        "decided and on their rows); the breakdown rows stop at the ~12 rows on screen.",
        "",
        *lines,
        "",
        *notes,
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100x10,10000x1000", help="VMSxHOSTS,... (smallest first)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/escort-bench-scale", help="where the generated fleets live")
    ap.add_argument("--regenerate", action="store_true")
    ap.add_argument("--record", action="store_true", help="add the report to bench/RESULTS.md")
    ap.add_argument("--cli-only", action="store_true",
                    help="only the one-pair rows (explain, targets); not recorded with --record")
    args = ap.parse_args()
    if shutil.which("tmux") is None:
        print("bench_scale needs tmux (apt-get install tmux)", file=sys.stderr)
        return 2
    # Bytecode first, as `pip install` leaves it: with PYTHONDONTWRITEBYTECODE set (as on
    # the shared machine) every escort process would otherwise compile escort's own
    # modules again (~60-100 ms of each one-pair answer), which no installed copy does.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "console")], check=True)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    results = []
    for vms, hosts in sizes:
        print(f"{vms:,} VMs x {hosts:,} hosts ...", flush=True)
        results.append(measure(vms, hosts, args.runs, Path(args.dir), args.regenerate, args.cli_only))
    text = report(results, args.runs)
    print(text)
    if args.record and not args.cli_only:
        record(text, section=SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
