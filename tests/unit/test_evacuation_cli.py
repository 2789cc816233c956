"""``escort evacuate`` / ``escort drain`` on the demo fleet (libvirt's test driver: plan only)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from console.cli import main
from console.demo import generate


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("demo") / "demo", at=dt.datetime.now(dt.UTC), seed="evac")


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_dry_run_json_plans_moves_and_names_owners(demo: Path) -> None:
    res = CliRunner().invoke(main, ["evacuate", "--fleet", str(demo), "fra-01", "nyc-01", "--admin", "oncall",
                                    "--dry-run", "--json"])
    assert res.exit_code == 1, res.output  # some VMs cannot move
    (plan, note) = _lines(res.output)
    assert plan["event"] == "plan" and plan["sources"] == ["fra-01", "nyc-01"]
    moves = plan["moves"]
    assert moves
    assert all(m["target"] not in ("fra-01", "nyc-01") and m["target"] in m["allowed"] for m in moves)
    stuck = plan["stuck"]
    assert stuck
    assert all(s["owner_to_contact"] and s["candidates"] for s in stuck)
    assert note["event"] == "demo" and "needs real hosts" in str(note["message"])


def test_without_dry_run_the_demo_says_moving_needs_real_hosts(demo: Path) -> None:
    res = CliRunner().invoke(main, ["evacuate", "--fleet", str(demo), "fra-01", "--admin", "oncall"])
    assert res.exit_code == 1
    assert "Moves:" in res.output or "Stuck" in res.output
    assert "needs real hosts" in res.output and "escort lab up" in res.output


def test_drain_plans_every_vm_under_the_ca(demo: Path) -> None:
    res = CliRunner().invoke(main, ["drain", "--fleet", str(demo), "--ca", "Asia-Pacific CA", "--dry-run",
                                    "--json"])
    (plan, _note) = _lines(res.output)
    assert sorted(plan["sources"]) == ["sgp-01", "tyo-01"]
    assert str(plan["title"]).startswith("drain CA Asia-Pacific CA (revoked)")
    vms = {m["vm"] for m in plan["moves"]} | {s["vm"] for s in plan["stuck"]}
    assert {"sgp-cache-01", "res-gpu-01"} <= vms


@pytest.mark.parametrize("args, needle", [
    (["evacuate", "no-such-host", "--dry-run"], "no host 'no-such-host'"),
    (["evacuate", "fra-01", "--parallel", "0", "--dry-run"], "at least 1"),
    (["drain", "--ca", "No Such CA", "--dry-run"], "no CA 'No Such CA'"),
    (["evacuate", "fra-01", "--admin", "oncall", "--cpu-ratio", "0", "--dry-run"], "ratio"),
])
def test_unusable_input_is_one_line_and_exit_2(demo: Path, args: list[str], needle: str) -> None:
    res = CliRunner().invoke(main, [args[0], "--fleet", str(demo), *args[1:]])
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_readonly_refuses_to_run_before_touching_any_host(tmp_path: Path) -> None:
    from tests.unit.test_evacuation_service import GenHost
    from tests.unit.test_evacuation_service import generate as gen

    g = gen(tmp_path, [GenHost("a", "eu"), GenHost("b", "eu")], [])
    res = CliRunner().invoke(main, ["--readonly", "evacuate", "--fleet", str(g.fleet), "a", "--yes"])
    assert res.exit_code == 3 and "read-only" in res.output
