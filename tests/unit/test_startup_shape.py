"""The shape of the console's cold start (issue 12): what runs before the start-up check's
helper is forked, and what the check's processes spend besides deciding."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from console.demo_scale import generate_scale
from console.services.fleet import FleetService, _prefetch_main


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_scale(tmp_path_factory.mktemp("f") / "f", vms=30, hosts=6, owners=3, rules=4)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private cache, memory and config (also for a child process)."""
    for name, sub in (("ESCORT_CACHE_DIR", "cache"), ("XDG_STATE_HOME", "state"),
                      ("XDG_CONFIG_HOME", "config")):
        monkeypatch.setenv(name, str(tmp_path / sub))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    return dict(os.environ)


#: a console launch (``escort --fleet F``) up to the helper's fork: what is imported by then
_AT_FORK = """
import sys
import console.services.fleet as fl

def start_prefetch(self):
    loaded = sorted(m for m in sys.modules if m.split(".")[0] == "textual" or m == "console.ui.app")
    print("AT-FORK", len(loaded), loaded[:3], flush=True)
    raise SystemExit(0)

fl.FleetService.start_prefetch = start_prefetch
from console.cli import main
sys.argv = ["escort", "--offline", "--fleet", sys.argv[1]]
main()
"""


def test_the_helper_is_forked_before_textual_is_imported(source: Path, env: dict[str, str]) -> None:
    """The helper starts as soon as the fleet file is read: Textual's import (~0.25 s of CPU)
    then runs while the helper works on the other core, not before it starts."""
    done = subprocess.run([sys.executable, "-c", _AT_FORK, str(source)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("AT-FORK")), "")
    assert line, (done.stdout, done.stderr)
    assert line.startswith("AT-FORK 0 "), line


#: a console launch (``escort --fleet F``) up to the console's run: the collector meanwhile
_TO_RUN = """
import gc
import sys
import console.services.fleet as fl
import console.ui.app as ui

seen = []
start_prefetch = fl.FleetService.start_prefetch

def prefetch(self):
    seen.append(gc.isenabled())
    return start_prefetch(self)

def run(self, *args, **kwargs):
    print("AT-RUN", seen, gc.isenabled(), gc.get_freeze_count() > 0, flush=True)
    gc.unfreeze()

fl.FleetService.start_prefetch = prefetch
ui.EscortApp.run = run
from console.cli import main
sys.argv = ["escort", "--offline", "--fleet", sys.argv[1]]
main()
"""


def test_no_cyclic_collection_while_the_console_starts(source: Path, env: dict[str, str]) -> None:
    """Loading the fleet, forking the helper, importing Textual and making the app (all of it
    lives as long as the console) run without the collector's passes; the console runs with
    it on again and what was made before frozen (never walked)."""
    done = subprocess.run([sys.executable, "-c", _TO_RUN, str(source)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("AT-RUN")), "")
    assert line == "AT-RUN [False] True True", (line, done.stdout, done.stderr)


def test_no_cyclic_collection_while_the_check_runs(source: Path, env: dict[str, str]) -> None:
    """The collector's passes over the check's objects found nothing and cost ~0.3 s of the
    console's CPU at 10,000 VMs: off while the check runs, on again when it ends."""
    assert gc.isenabled()
    service = FleetService.load(source, eager=False)
    states = [gc.isenabled() for _ in service.check_in_steps()]
    assert states and not any(states)
    assert gc.isenabled()
    # a check abandoned half-way (a refresh replaces it) turns collection back on too
    again = FleetService.load(source, eager=False)
    steps = again.check_in_steps(budget_s=0.0)
    next(steps)
    assert not gc.isenabled()
    steps.close()
    assert gc.isenabled()
    # and collection that was off before stays off
    gc.disable()
    try:
        list(FleetService.load(source, eager=False).check_in_steps())
        assert not gc.isenabled()
    finally:
        gc.enable()


class _Pipe:
    """The helper's end of the pipe, in-process: what it sends and whether the collector was
    on when it did."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bool]] = []

    def send(self, message: Any) -> None:
        self.sent.append((message[0], gc.isenabled()))

    def close(self) -> None:
        pass


def test_the_helper_runs_without_cyclic_collection(source: Path, env: dict[str, str]) -> None:
    """The helper (a short-lived fork) never spends its core on collector passes."""
    service = FleetService.load(source, eager=False)
    service.use_cache = True
    pipe = _Pipe()
    try:
        _prefetch_main(service, pipe)  # type: ignore[arg-type]
        # called in-process (as here), the caller's collector is as it was afterwards
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
    assert [kind for kind, _ in pipe.sent][:2] == ["tokens", "hosts"]
    assert pipe.sent[-1][0] == "done"
    # never on while it works: not for the host chains, not for the tokens opened after them
    assert len(pipe.sent) > 3 and not any(on for _, on in pipe.sent)
    # the forked helper (given the console's end of the pipe to close) leaves it off: it exits
    forked = FleetService.load(source, eager=False)
    try:
        _prefetch_main(forked, _Pipe(), _Pipe())  # type: ignore[arg-type]
        assert not gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()
