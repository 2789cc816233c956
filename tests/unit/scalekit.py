"""Shared pieces of the start-up check's tests on a small generated fleet."""

from __future__ import annotations

import multiprocessing
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from console.services.fleet import FleetService, _prefetch_main


def private_fleet(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the generated fleet (tests change its files), a private cache and
    a private (empty) policy memory."""
    dest = tmp_path / "fleet"
    shutil.copytree(source.parent, dest)
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    return dest / source.name


def helper_messages(fleet: Path) -> list[Any]:
    """Every message the start-up check's real helper (``_prefetch_main``) sends for ``fleet``,
    in order, received over a real pipe (run on a thread: the same code a fork runs)."""
    receive, send = multiprocessing.Pipe(duplex=False)
    helper = FleetService.load(fleet, eager=False)
    run = threading.Thread(target=_prefetch_main, args=(helper, send))
    run.start()
    messages = []
    while True:
        try:
            messages.append(receive.recv())
        except EOFError:
            break
    run.join()
    return messages
