"""One verdict everywhere: the lean one-pair answers (`explain`/`targets --offline`, which
read only the VM asked about, its policy, one host chain and the grants) say exactly
what the full load the console uses says -- same verdict, same reasons, same steps --
and refuse the same bad input."""

from __future__ import annotations

import datetime as dt
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


# ------------------------------------------------------------------------------------------------
# The cached paths: the fleet file and the policy memory parsed once and reused by the next run
# (adapters/parsecache.py). The reference is always the console's full load with no cache at all.

def _reference(path: Path, vm: str, host: str, admin: str | None,
               monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    with monkeypatch.context() as m:
        m.setenv("ESCORT_NO_CACHE", "1")
        return json.loads(json.dumps(full(path).explain(vm, host, admin).as_json()))


def _lean(path: Path, vm: str, host: str, admin: str | None = None) -> tuple[int, dict[str, object]]:
    extra = ["--admin", admin] if admin else []
    r = run("explain", "--offline", "--fleet", str(path), "--at", AT, "--json", *extra, vm, host)
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout)


def _spoil(cache: Path, how: str) -> None:
    import os

    entries = sorted(cache.glob("parsed-*.cache"))
    assert {e.name.split("-")[1] for e in entries} == {"fleet", "memory"}
    for entry in entries:
        if how == "corrupt":
            data = bytearray(entry.read_bytes())
            data[-3] ^= 0xFF
            entry.write_bytes(bytes(data))
        elif how == "foreign" and os.getuid() == 0:
            os.chown(entry, 12345, 12345)
        elif how == "foreign":
            entry.chmod(0o666)  # (not root: a file others may write is not trusted either)
        elif how == "truncated":
            entry.write_bytes(entry.read_bytes()[:100])


@pytest.mark.parametrize("spoil", ["kept", "corrupt", "foreign", "truncated"])
def test_cached_one_pair_answers_are_the_full_loads_decision(
        fleet: FleetFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spoil: str) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(cache))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    path = _copy(fleet, tmp_path)
    full(path).vms()  # a console's check: the policy memory is written
    want = {(vm, host, admin): _reference(path, vm, host, admin, monkeypatch) for vm, host, admin in PAIRS}
    for _round in range(3):  # builds the cache, uses it, uses it after it was spoilt
        for (vm, host, admin), reference in want.items():
            code, lean = _lean(path, vm, host, admin)
            assert lean == reference
            assert code == (0 if reference["allowed"] else 1)
        if _round == 1:
            _spoil(cache, spoil)
    # targets too
    r = run("targets", "--offline", "--fleet", str(path), "--at", AT, "--json", "web-1")
    with monkeypatch.context() as m:
        m.setenv("ESCORT_NO_CACHE", "1")
        decisions = full(path).targets("web-1")
    assert json.loads(r.stdout)["allowed"] == [d.host for d in decisions if d.allowed]


def test_a_change_between_cached_runs_changes_the_answer(fleet: FleetFiles, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    path = _copy(fleet, tmp_path)
    service = full(path)
    service.vms()
    for _ in range(2):  # the second run answers from the cache
        code, lean = _lean(path, "web-1", "hv-fr-1")
        assert code == 0 and lean == _reference(path, "web-1", "hv-fr-1", None, monkeypatch)
    # the memory now says escort has seen a newer policy of web-1: this one is a rollback
    assert service._memory_path is not None
    memory = service._memory_path
    data = json.loads(memory.read_text())
    data["vms"][WEB_UUID].update(seq=data["vms"][WEB_UUID]["seq"] + 1, digest="0" * 64)
    memory.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    code, lean = _lean(path, "web-1", "hv-fr-1")
    assert code == 1 and "policy.rollback" in {r["code"] for r in lean["reasons"]}  # type: ignore[attr-defined]
    assert lean == _reference(path, "web-1", "hv-fr-1", None, monkeypatch)
    # the fleet file now gives hv-fr-1 the US host's certificate: refused for the country
    path.write_text(path.read_text().replace('cert_file = "certs/hv-fr-1.pem"',
                                             'cert_file = "certs/hv-us-1.pem"'))
    code, lean = _lean(path, "db-1", "hv-fr-1")
    assert lean == _reference(path, "db-1", "hv-fr-1", None, monkeypatch)
    _, before = _lean(path, "web-1", "hv-de-1")
    path.write_text(path.read_text().replace('name = "web-1"', 'name = "web-one"'))
    r = run("explain", "--offline", "--fleet", str(path), "--at", AT, "web-1", "hv-de-1")
    assert r.exit_code == 2 and "no VM 'web-1'" in r.stderr
    assert _lean(path, "web-one", "hv-de-1")[1]["vm"] == "web-one" != before["vm"]


def test_an_unwritable_cache_is_one_notice_and_the_same_answer(fleet: FleetFiles, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    path = _copy(fleet, tmp_path)
    full(path).vms()
    r = run("explain", "--offline", "--fleet", str(path), "--at", AT, "--json", "web-1", "hv-fr-1")
    assert json.loads(r.stdout) == _reference(path, "web-1", "hv-fr-1", None, monkeypatch)
    assert r.stderr.startswith("escort: no cache of verified results:") and r.stderr.count("\n") == 1


def test_the_escort_process_leaves_at_once_with_its_whole_answer(fleet: FleetFiles, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The real process (``python -m console.cli``, as the ``escort`` script) skips the
    interpreter's teardown (console.cli.finish): its output, piped, is whole and its exit
    code is the verdict's, for an allowed and a refused pair and for targets."""
    import subprocess
    import sys

    for vm, host, admin in PAIRS[:3]:
        extra = ["--admin", admin] if admin else []
        done = subprocess.run([sys.executable, "-m", "console.cli", "explain", "--offline", "--fleet",
                               str(fleet.fleet), "--at", AT, "--json", *extra, vm, host],
                              capture_output=True, text=True, check=False)
        want = _reference(fleet.fleet, vm, host, admin, monkeypatch)
        assert json.loads(done.stdout) == want, done.stderr
        assert done.returncode == (0 if want["allowed"] else 1) and done.stderr == ""
    done = subprocess.run([sys.executable, "-m", "console.cli", "targets", "--offline", "--fleet",
                           str(fleet.fleet), "--at", AT, "web-1"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("web-1: 1 of 4 host(s) allowed")
    assert done.stdout.endswith("\n") and done.stdout.count("refused") == 3


# ------------------------------------------------------------------------------------------------
# targets --offline: host chain results kept between runs (FleetService._adopt_chains)

def _targets(path: Path, vm: str, at: dt.datetime = T0, *,
             workers: int = 1) -> tuple[list[dict[str, object]], FleetService]:
    service = FleetService.load_strict(path, at=at, only_vm=vm)
    return [d.as_json() for d in service.targets(vm, at=at, workers=workers)], service


def _targets_reference(path: Path, vm: str, at: dt.datetime,
                       monkeypatch: pytest.MonkeyPatch) -> list[object]:
    with monkeypatch.context() as m:
        m.setenv("ESCORT_NO_CACHE", "1")
        service = FleetService.load(path, at=at)
        return [d.as_json() for d in service.targets(vm, at=at)]


@pytest.fixture
def chain_fleet(fleet: FleetFiles, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ESCORT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ESCORT_NO_CACHE", raising=False)
    return _copy(fleet, tmp_path)


HOSTS = {"hv-de-1", "hv-fr-1", "hv-us-1", "hv-de-old"}


def test_cached_host_chains_give_the_full_loads_targets(chain_fleet: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for vm in ("web-1", DB_UUID):
        want = _targets_reference(chain_fleet, vm, T0, monkeypatch)
        first, service = _targets(chain_fleet, vm)
        assert first == want
        again, service = _targets(chain_fleet, vm)
        assert again == want and service._chain_hits == HOSTS  # every chain from the cache
        later = T0 + dt.timedelta(minutes=5)  # no instant in between: still adopted, same answer
        answer, service = _targets(chain_fleet, vm, later)
        assert answer == _targets_reference(chain_fleet, vm, later, monkeypatch)
        assert service._chain_hits == HOSTS


def test_a_changed_certificate_or_trust_directory_is_checked_anew(chain_fleet: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _targets(chain_fleet, "web-1")
    certs = chain_fleet.parent / "certs"
    (certs / "hv-fr-1.pem").write_bytes((certs / "hv-us-1.pem").read_bytes())  # fr now presents us's cert
    answer, service = _targets(chain_fleet, "web-1")
    assert answer == _targets_reference(chain_fleet, "web-1", T0, monkeypatch)
    assert service._chain_hits == HOSTS - {"hv-fr-1"}
    assert next(d for d in answer if d["host"] == "hv-fr-1")["allowed"] is False
    # the EU CA's CRL is gone: no chain result of before may be adopted
    (chain_fleet.parent / "trust" / "hosts" / "eu.crl").unlink()
    answer, service = _targets(chain_fleet, "web-1")
    assert answer == _targets_reference(chain_fleet, "web-1", T0, monkeypatch) and not service._chain_hits
    assert "revocation.missing" in json.dumps(answer)


@pytest.mark.parametrize("days", [-400, 400, 3650])
def test_a_result_is_not_adopted_across_an_instant_that_matters(chain_fleet: Path, days: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Computed at T0, asked a year before or after (certificates not yet valid / expired):
    checked anew, and the answer is the one a full load gives then."""
    _targets(chain_fleet, "web-1")
    when = T0 + dt.timedelta(days=days)
    answer, service = _targets(chain_fleet, "web-1", when)
    assert answer == _targets_reference(chain_fleet, "web-1", when, monkeypatch)
    assert not service._chain_hits


def test_chains_checked_by_forked_helpers_are_kept_too(chain_fleet: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from console.services import fleet as svc

    monkeypatch.setattr(svc, "PARALLEL_MIN_HOSTS", 1)
    monkeypatch.setattr(svc.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(svc.threading, "active_count", lambda: 1)  # (the test runner's own threads)
    forks: list[int] = []
    real_fork = svc.os.fork

    def fork() -> int:
        pid = real_fork()
        forks.append(pid)
        return pid

    monkeypatch.setattr(svc.os, "fork", fork)
    want = _targets_reference(chain_fleet, "web-1", T0, monkeypatch)
    first, service = _targets(chain_fleet, "web-1", workers=2)
    assert first == want and not service._chain_hits and len(forks) == 1
    assert "hv-de-old" not in service._host_certs  # (the last host: checked by the helper only)
    again, service = _targets(chain_fleet, "web-1", workers=2)
    assert again == want and service._chain_hits == HOSTS


@pytest.mark.parametrize("spoil", ["corrupt", "foreign", "odd"])
def test_a_spoilt_chain_cache_is_not_used(chain_fleet: Path, tmp_path: Path, spoil: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    _targets(chain_fleet, "web-1")
    (entry,) = (tmp_path / "cache").glob("parsed-chains-*.cache")
    if spoil == "corrupt":
        entry.write_bytes(entry.read_bytes()[:-40] + b"x" * 40)
    elif spoil == "foreign":
        os.chmod(entry, 0o666)
    else:  # right file, right key, entries of another shape
        service = FleetService.load_strict(chain_fleet, at=T0, only_vm="web-1")
        got = service._chain_store()
        assert got is not None
        store, key = got
        entries = store.load(key)
        assert isinstance(entries, dict) and len(entries) == len(HOSTS)
        store.save(key, {k: (e[0], e[1], e[2], "not a chain result") for k, e in entries.items()})
    answer, service = _targets(chain_fleet, "web-1")
    assert answer == _targets_reference(chain_fleet, "web-1", T0, monkeypatch) and not service._chain_hits
