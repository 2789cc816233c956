"""One verdict everywhere: the lean one-pair answers (`explain`/`targets --offline`, which
read only the VM asked about, its policy, one host chain and the grants) say exactly
what the full load the console uses says -- same verdict, same reasons, same steps --
and refuse the same bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from console.cli import main
from console.core.errors import EscortError, InputError
from console.services.fleet import FleetService
from tests.unit.trustkit import DB_UUID, T0, WEB_UUID, FleetFiles, build_fleet

AT = T0.isoformat()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> FleetFiles:
    return build_fleet(tmp_path_factory.mktemp("fleet"))


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def full(path: Path) -> FleetService:
    """The console's load: every host chain checked, every policy opened."""
    service = FleetService.load(path, at=T0)
    assert not service._fatal
    return service


PAIRS = [
    ("web-1", "hv-fr-1", None),  # allowed
    ("web-1", "hv-fr-1", "anne"),  # allowed with anne's grant
    ("web-1", "hv-fr-1", "bert"),  # refused: bert holds no grant
    ("web-1", "hv-fr-1", "ghost"),  # refused: not an admin of the fleet
    (WEB_UUID, "hv-us-1", None),  # refused: CA and country, asked by UUID
    (WEB_UUID.upper(), "hv-de-1", None),  # a UUID in capitals finds the same VM
    ("web-1", "hv-de-old", None),  # refused: expired host certificate
    ("db-1", "hv-de-1", "anne"),  # refused: anne's grant names web-1 only
    ("db-1", "hv-us-1", None),
    (DB_UUID, "hv-de-old", None),
]


@pytest.mark.parametrize(("vm", "host", "admin"), PAIRS)
def test_explain_offline_is_the_full_loads_decision(fleet: FleetFiles, vm: str, host: str,
                                                     admin: str | None) -> None:
    extra = ["--admin", admin] if admin else []
    r = run("explain", "--offline", "--fleet", str(fleet.fleet), "--at", AT, "--json", *extra, vm, host)
    assert r.exit_code in (0, 1), r.output
    lean = json.loads(r.stdout)
    want = full(fleet.fleet).explain(vm, host, admin).as_json()
    assert lean == json.loads(json.dumps(want))
    assert r.exit_code == (0 if want["allowed"] else 1)


@pytest.mark.parametrize("vm", ["web-1", DB_UUID])
def test_targets_offline_is_the_full_loads_answer_and_the_console_row(fleet: FleetFiles, vm: str) -> None:
    r = run("targets", "--offline", "--fleet", str(fleet.fleet), "--at", AT, "--json", vm)
    assert r.exit_code in (0, 1), r.output
    lean = json.loads(r.stdout)
    service = full(fleet.fleet)
    decisions = service.targets(vm)
    assert lean["allowed"] == [d.host for d in decisions if d.allowed]
    assert lean["refused"] == [{"host": d.host, "reasons": [x.as_json() for x in d.reasons]}
                               for d in decisions if not d.allowed]
    # the console's row for the VM (the matrix) names the same hosts
    row = next(v for v in service.vms() if vm in (v.name, v.uuid))
    assert sorted(lean["allowed"]) == sorted(row.allowed_targets)


def _copy(fleet: FleetFiles, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(fleet.fleet.parent, copy)
    return copy / fleet.fleet.name


@pytest.mark.parametrize(("change", "needle"), [
    # another VM's row is broken: the whole fleet file is unusable, for every command
    (lambda t: t.replace('name = "db-1"', 'name = ""'), "vms[1].name: must not be empty"),
    (lambda t: t.replace(f'uuid = "{DB_UUID}"', 'uuid = "not-a-uuid"'), "is not a UUID"),
    (lambda t: t.replace('host = "hv-us-1"', 'host = "nowhere"'), "'nowhere' is not one of the [[hosts]]"),
    (lambda t: t.replace(f'uuid = "{DB_UUID}"', f'uuid = "{WEB_UUID}"'), "appears twice"),
    (lambda t: t.replace('policy_file = "policies/db-1.jws"',
                         'policy_file = "policies/db-1.jws"\ncolour = 1'), "unknown key"),
    (lambda t: t.replace('trust_dir = "trust/hosts"', 'trust_dir = "trust/nowhere"'), "trust"),
])
def test_bad_input_anywhere_in_the_fleet_refuses_the_one_pair_answer_too(
        fleet: FleetFiles, tmp_path: Path, change: object, needle: str) -> None:
    path = _copy(fleet, tmp_path)
    path.write_text(change(path.read_text()))  # type: ignore[operator]
    for args in (["explain", "web-1", "hv-fr-1"], ["targets", "web-1"]):
        r = run(args[0], "--offline", "--fleet", str(path), "--at", AT, *args[1:])
        assert r.exit_code == 2, r.output
        assert needle in r.stderr and r.stderr.count("\n") == 1
    with pytest.raises(InputError) as err:  # the console's full load refuses it as well
        FleetService.load_strict(path, at=T0, eager=True)
    assert needle in str(err.value)


def test_two_vms_of_one_name_refuse_the_name_in_both_paths(fleet: FleetFiles, tmp_path: Path) -> None:
    path = _copy(fleet, tmp_path)
    path.write_text(path.read_text().replace('name = "db-1"', 'name = "web-1"'))
    r = run("explain", "--offline", "--fleet", str(path), "--at", AT, "web-1", "hv-fr-1")
    assert r.exit_code == 2 and "2 VMs are named 'web-1'; use the UUID" in r.stderr
    with pytest.raises(InputError, match="2 VMs are named 'web-1'"):
        full(path).explain("web-1", "hv-fr-1")
    # by UUID each is found, and both paths agree
    lean = run("explain", "--offline", "--fleet", str(path), "--at", AT, "--json", DB_UUID, "hv-us-1")
    assert json.loads(lean.stdout) == json.loads(json.dumps(full(path).explain(DB_UUID, "hv-us-1").as_json()))


@pytest.mark.parametrize(("vm", "host", "needle"), [
    ("nosuchvm", "hv-fr-1", "no VM 'nosuchvm'"),
    ("web-1", "nosuchhost", "no host 'nosuchhost'"),
])
def test_unknown_names_are_the_same_error(fleet: FleetFiles, vm: str, host: str, needle: str) -> None:
    r = run("explain", "--offline", "--fleet", str(fleet.fleet), "--at", AT, vm, host)
    assert r.exit_code == 2 and needle in r.stderr
    with pytest.raises(InputError) as err:
        full(fleet.fleet).explain(vm, host)
    assert needle in str(err.value)


def test_a_one_vm_service_keeps_only_what_the_key_finds_and_takes_no_refresh(fleet: FleetFiles) -> None:
    lean = FleetService.load_strict(fleet.fleet, at=T0, only_vm="web-1")
    assert [r.name for r in lean._vms.values()] == ["web-1"]
    assert FleetService.load_strict(fleet.fleet, at=T0, only_vm=DB_UUID.upper())._vms.keys() == {DB_UUID}
    with pytest.raises(EscortError, match="cannot take a refresh"):
        lean.apply_facts("hv-fr-1", None, None)


def test_targets_shared_with_forked_helpers_are_the_plain_answer(fleet: FleetFiles,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from console.services import fleet as svc

    monkeypatch.setattr(svc, "PARALLEL_MIN_HOSTS", 1)
    monkeypatch.setattr(svc.os, "cpu_count", lambda: 3)
    plain = FleetService.load_strict(fleet.fleet, at=T0).targets("web-1", "anne")
    forked = FleetService.load_strict(fleet.fleet, at=T0, only_vm="web-1").targets("web-1", "anne", workers=3)
    assert [d.as_json() for d in forked] == [d.as_json() for d in plain]
    assert {d.host for d in forked} == {"hv-de-1", "hv-fr-1", "hv-us-1", "hv-de-old"}
    # the CLI takes this path too, and still says what the console's full load says
    r = run("targets", "--offline", "--fleet", str(fleet.fleet), "--at", AT, "--json", "web-1")
    assert json.loads(r.stdout)["allowed"] == [d.host for d in plain if d.allowed] == ["hv-fr-1"]


def test_a_helper_that_fails_is_not_trusted(fleet: FleetFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper whose work fails sends nothing usable: its share is decided again by the
    calling process (which then raises what the plain loop raises, or answers)."""
    import os

    from console.services import fleet as svc

    monkeypatch.setattr(svc, "PARALLEL_MIN_HOSTS", 1)
    monkeypatch.setattr(svc.os, "cpu_count", lambda: 2)
    parent = os.getpid()
    real = FleetService._decide

    def decide_or_fail_in_helper(self: FleetService, *args: object, **kwargs: object) -> object:
        if os.getpid() != parent:
            raise RuntimeError("helper broke")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(FleetService, "_decide", decide_or_fail_in_helper)
    plain = [d.as_json() for d in FleetService.load_strict(fleet.fleet, at=T0).targets("db-1")]
    forked = FleetService.load_strict(fleet.fleet, at=T0, only_vm="db-1").targets("db-1", workers=2)
    assert [d.as_json() for d in forked] == plain


def test_the_collector_is_back_after_a_one_pair_answer(fleet: FleetFiles) -> None:
    """explain/targets run without cyclic GC (console/cli NO_GC); an in-process caller gets
    it back whatever the exit (allowed, refused, bad input)."""
    import gc

    for args in (["explain", "web-1", "hv-fr-1"], ["explain", "web-1", "hv-us-1"], ["targets", "web-1"],
                 ["explain", "nosuchvm", "hv-fr-1"]):
        run(args[0], "--offline", "--fleet", str(fleet.fleet), "--at", AT, *args[1:])
        assert gc.isenabled()


@pytest.mark.parametrize("gone", [("hv-us-1", "hv-de-old"), ("hv-de-old",), ("hv-fr-1", "hv-de-old")])
def test_forked_targets_name_the_same_unreadable_certificate(fleet: FleetFiles, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             gone: tuple[str, ...]) -> None:
    from console.services import fleet as svc

    monkeypatch.setattr(svc, "PARALLEL_MIN_HOSTS", 1)
    monkeypatch.setattr(svc.os, "cpu_count", lambda: 2)
    path = _copy(fleet, tmp_path)
    for host in gone:
        (path.parent / "certs" / f"{host}.pem").unlink()
    errors = []
    for workers in (1, 2):
        with pytest.raises(InputError) as err:
            FleetService.load_strict(path, at=T0, only_vm="web-1").targets("web-1", workers=workers)
        errors.append(str(err.value))
    assert errors[0] == errors[1] and f"{gone[0]}.pem" in errors[0]
