"""Holes found by attacking the lab's guard from outside (plain virsh, a root shell).

* **Laundered strip**: the policy is removed with ``virsh metadata --remove``, then any
  routine `escort hosts guard install` pushes a VM list without that VM (the list is
  "VMs with a policy now"), and ``virsh migrate`` to a host the policy refuses was
  admitted as ``guard.no_policy``, although the same guard.json still held escort's
  memory of the VM's policy (``seen``). The guard now treats a VM in either memory as
  policy-carrying, and `escort check` reports such a VM wherever it runs.
* **Files that are not files**: guard.json or the host certificate replaced by a symlink
  to /dev/zero was read whole (the hook filled memory until it was killed: no log line,
  no reason); a FIFO would hang the hook, and libvirt waits for a hook without a timeout.
* **A held memory lock** hung every admitting hook (flock without a deadline).
* guard.json was read with plain ``json``: duplicate keys (the last one wins) passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from console.core.errors import InputError
from console.core.guard import GuardConfig, guard_decide
from console.guard import hook
from console.services.check import misplaced
from console.services.fleet import FleetService
from tests.unit.test_guard import _plan, domain_xml
from tests.unit.trustkit import T0, WEB_UUID, FleetFiles, build_fleet

HOST = "hv-fr-1"
OTHER = "11111111-2222-3333-4444-555555555555"


@pytest.fixture()
def fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FleetFiles:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))  # escort's memory: this test's own
    return build_fleet(tmp_path)


def test_a_strip_laundered_by_a_later_install_is_still_refused(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    config, material = _plan(s, HOST)
    cert = (fleet.root / "certs" / f"{HOST}.pem").read_bytes()
    assert WEB_UUID in config.seen and WEB_UUID in config.policy_uuids
    # what an install pushes after `virsh metadata --remove`: web-1 is no longer in the list,
    # but escort's memory (pushed in the same guard.json) still has its policy
    after = replace(config, policy_uuids=frozenset(config.policy_uuids - {WEB_UUID}))
    v = guard_decide(domain_xml("web-1", WEB_UUID), cert, material, after, T0)
    assert not v.allowed and v.code == "guard.policy_stripped", v
    assert "escort's memory of policies: seq " in v.message
    # only this guard's own memory knows it (escort never pushed it): refused too
    bare = replace(after, seen={})
    v = guard_decide(domain_xml("web-1", WEB_UUID), cert, material, bare, T0, dict(config.seen))
    assert not v.allowed and v.code == "guard.policy_stripped" and "this host's memory" in v.message
    # a VM nobody ever saw with a policy: the host's no_policy setting, as before
    v = guard_decide(domain_xml("plain", OTHER), cert, material, after, T0, dict(config.seen))
    assert v.allowed and v.code == "guard.no_policy"
    v = guard_decide(domain_xml("web-1", WEB_UUID), cert, material, bare, T0)
    assert v.allowed and v.code == "guard.no_policy"


def test_check_reports_a_vm_whose_remembered_policy_was_removed(fleet: FleetFiles) -> None:
    first = FleetService.load(fleet.fleet, at=T0)
    assert first.policy(WEB_UUID).seen_entry() is not None
    first.remember_policies({WEB_UUID: first.policy(WEB_UUID).seen_entry()})  # type: ignore[dict-item]
    assert misplaced(first, T0) == [] or all(p.uuid != WEB_UUID for p in misplaced(first, T0))
    text = fleet.fleet.read_text().replace('policy_file = "policies/web-1.jws"\n', "", 1)
    fleet.fleet.write_text(text)
    second = FleetService.load(fleet.fleet, at=T0)
    assert not second.policy_token(WEB_UUID)
    found = [p for p in misplaced(second, T0) if p.uuid == WEB_UUID]
    assert found and found[0].reasons[0].code == "guard.policy_stripped", found
    assert "escort remembers one (seq " in found[0].reasons[0].message


def _conf(tmp_path: Path, fleet: FleetFiles) -> tuple[Path, dict[str, str]]:
    """The pushed guard.json + trust material under tmp_path/conf, and the hook's env."""
    from console.services.guard import payload, plan_for
    from tests.unit.test_guard import _unpack

    s = FleetService.load(fleet.fleet, at=T0)
    assert s.spec is not None
    spec = next(h for h in s.spec.hosts if h.name == HOST)
    spec = type(spec)(**{**spec.__dict__, "remote_cert": str(fleet.root / "certs" / f"{HOST}.pem")})
    root = tmp_path / "host"
    _unpack(payload(plan_for(s, spec), with_code=False), root)
    env = {"ESCORT_GUARD_CONF": str(root / "conf"), "ESCORT_GUARD_LOG": str(root / "guard.log"),
           "ESCORT_GUARD_SEEN": str(root / "state" / "seen.json"), "ESCORT_GUARD_AT": T0.isoformat(),
           "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return root, env


_LIMITED = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (768 << 20, 768 << 20)); "
            "from console.guard.hook import main; sys.exit(main(sys.argv))")


def _hook(env: dict[str, str], token: str) -> subprocess.CompletedProcess[str]:
    """The hook as libvirt runs it, with 768 MiB of address space and a 20 s limit."""
    return subprocess.run([sys.executable, "-c", _LIMITED, "web-1", "prepare", "begin", "-"],
                          input=domain_xml("web-1", WEB_UUID, token), env=env, capture_output=True,
                          text=True, timeout=20, check=False)


def _log(root: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in (root / "guard.log").read_text().splitlines()]


def test_config_and_certificate_must_be_regular_files(fleet: FleetFiles, tmp_path: Path) -> None:
    root, env = _conf(tmp_path, fleet)
    token = (fleet.root / "policies" / "web-1.jws").read_text().strip()
    assert _hook(env, token).returncode == 0
    conf = root / "conf" / "guard.json"
    good = conf.read_bytes()
    # guard.json -> /dev/zero: was read until memory ran out (guard.internal: MemoryError here,
    # the kernel's OOM killer on a host); now refused at once, naming the file
    conf.unlink()
    conf.symlink_to("/dev/zero")
    p = _hook(env, token)
    assert p.returncode == 1 and "guard.trust_unusable" in p.stderr, p.stderr
    assert "not a regular file" in p.stderr, p.stderr
    # a FIFO: opening it blocked the hook (and libvirt with it) until a writer came
    conf.unlink()
    os.mkfifo(conf)
    p = _hook(env, token)
    assert p.returncode == 1 and "guard.trust_unusable" in p.stderr, p.stderr
    conf.unlink()
    conf.write_bytes(good)
    # the host certificate -> /dev/zero: the same, and the reason says what is wrong with it
    data = json.loads(good)
    data["host_cert"] = "/dev/zero"
    conf.write_text(json.dumps(data))
    p = _hook(env, token)
    assert p.returncode == 1, p.stderr
    assert "guard.host_cert_unreadable" in p.stderr and "/dev/zero: not a regular file" in p.stderr, p.stderr
    assert [e["reason"] for e in _log(root)] == ["guard.admitted", "guard.trust_unusable",
                                                 "guard.trust_unusable", "guard.host_cert_unreadable"]


def test_read_regular_bounds(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert hook.read_regular(f, 100) == b"x" * 100
    with pytest.raises(OSError, match="larger than"):
        hook.read_regular(f, 99)
    with pytest.raises(OSError, match="not a regular file"):
        hook.read_regular(tmp_path, 10)
    with pytest.raises(FileNotFoundError):
        hook.read_regular(tmp_path / "missing", 10)


def test_a_held_memory_lock_does_not_hang_the_hook(fleet: FleetFiles, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    s = FleetService.load(fleet.fleet, at=T0)
    entry = s.policy(WEB_UUID).seen_entry()
    memory = tmp_path / "state" / "seen.json"
    memory.parent.mkdir()
    monkeypatch.setattr(hook, "LOCK_WAIT_S", 0.3, raising=False)
    result: list[object] = []

    def record() -> None:
        try:
            result.append(hook.remember(WEB_UUID, entry, memory))
        except OSError as exc:
            result.append(exc)

    with open(memory.with_suffix(".lock"), "a") as held:  # someone holds the lock for good
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        t = threading.Thread(target=record, daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "remember() waited for the lock without a deadline"
    assert len(result) == 1 and isinstance(result[0], OSError) and "still locked" in str(result[0])
    assert hook.remember(WEB_UUID, entry, memory) is True  # free again: recorded


def test_guard_json_with_duplicate_keys_is_refused(fleet: FleetFiles) -> None:
    s = FleetService.load(fleet.fleet, at=T0)
    config, _material = _plan(s, HOST)
    text = json.dumps(config.as_json("d"))
    GuardConfig.parse(text.encode())
    twice = text.replace('{"version"', '{"no_policy": "refuse", "version"', 1)
    assert twice.count('"no_policy"') == 2
    with pytest.raises(InputError, match=r"guard\.json is not JSON"):
        GuardConfig.parse(twice.encode())


def _launcher_on(tmp_path: Path, fleet: FleetFiles, host: str) -> tuple[Path, Path, dict[str, str]]:
    """The launcher libvirt runs (console/services/guard.py), reading this checkout's code,
    with ``host``'s pushed configuration; (launcher, host root, env)."""
    from console.services.guard import _LAUNCHER, payload, plan_for
    from tests.unit.test_guard import _unpack

    s = FleetService.load(fleet.fleet, at=T0)
    assert s.spec is not None
    spec = next(h for h in s.spec.hosts if h.name == host)
    spec = type(spec)(**{**spec.__dict__, "remote_cert": str(fleet.root / "certs" / f"{host}.pem")})
    root = tmp_path / host
    _unpack(payload(plan_for(s, spec), with_code=False), root)
    launcher = root / "escort-guard"
    launcher.write_text(_LAUNCHER.format(version="test", lib=Path(__file__).resolve().parents[2],
                                         log=root / "guard.log"))
    launcher.chmod(0o755)
    env = {"ESCORT_GUARD_CONF": str(root / "conf"), "ESCORT_GUARD_LOG": str(root / "guard.log"),
           "ESCORT_GUARD_SEEN": str(root / "state" / "seen.json"), "ESCORT_GUARD_AT": T0.isoformat(),
           "PATH": "/usr/bin:/bin"}
    return launcher, root, env


@pytest.mark.parametrize("name", ["--dry-run", "--status"])
def test_a_vm_named_like_an_option_is_still_checked(fleet: FleetFiles, tmp_path: Path, name: str) -> None:
    """libvirt runs ``escort-guard NAME OP SUBOP -``; a domain named ``--dry-run`` made that
    ``--dry-run prepare begin -`` (read as a dry run of op ``begin``: exit 0), and one named
    ``--status`` printed the status and exited 0: either VM started where its policy refuses
    it (found in the lab: `virsh define` + `virsh start`, or `virsh migrate --dname`)."""
    s = FleetService.load(fleet.fleet, at=T0)
    refusing = next(h.name for h in s.hosts() if any(
        r.severity == "error" and r.code != "host.current" for r in s.explain(WEB_UUID, h.name).reasons))
    launcher, root, env = _launcher_on(tmp_path, fleet, refusing)
    token = (fleet.root / "policies" / "web-1.jws").read_text().strip()
    xml = domain_xml(name, WEB_UUID, token)
    for op in ("prepare", "migrate", "restore"):
        p = subprocess.run([sys.executable, str(launcher), name, op, "begin", "-"], input=xml,
                           env=env, capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 1, (op, p.stdout, p.stderr)
        assert p.stdout == ""  # libvirt would take stdout as a replacement XML (migrate, restore)
        assert p.stderr.startswith(f"escort-guard refused {name}: "), p.stderr
    # the operator forms still work in their exact shape
    st = subprocess.run([sys.executable, str(launcher), "--status"], env=env,
                        capture_output=True, text=True, timeout=60, check=False)
    assert st.returncode == 0 and json.loads(st.stdout)["host"] == refusing
    dry = subprocess.run([sys.executable, str(launcher), "--dry-run", "web-1", "migrate", "begin",
                          "-"], input=xml, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert dry.returncode == 1 and dry.stderr.startswith("escort-guard refused "), dry.stderr
    sources = [e["source"] for e in _log(root)]
    assert sources == ["process start", "incoming migration", "restore", "dry-run"], sources


def test_launcher_fallback_matches_the_core() -> None:
    from console.core.guard import CHECKED_OPS
    from console.services.guard import _LAUNCHER

    assert set(CHECKED_OPS) == hook.FALLBACK_CHECKED_OPS
    for op, sub in CHECKED_OPS:
        assert f'("{op}", "{sub}")' in _LAUNCHER


@pytest.mark.parametrize(("damage", "code"), [
    ("truncated", "guard.broken"),  # was: a Python traceback on stderr, nothing logged
    ("exits", "guard.broken"),  # was: exit 0 (SystemExit is not an Exception): admitted
])
def test_a_damaged_bundle_refuses_with_one_line(fleet: FleetFiles, tmp_path: Path, damage: str,
                                                code: str) -> None:
    import shutil

    from console.services.guard import _LAUNCHER

    launcher, root, env = _launcher_on(tmp_path, fleet, HOST)
    lib = tmp_path / "lib"
    shutil.copytree(Path(__file__).resolve().parents[2] / "console", lib / "console",
                    ignore=shutil.ignore_patterns("__pycache__", "ui", "lab"))
    if damage == "truncated":  # a partial write of the core: it no longer imports
        f = lib / "console" / "core" / "guard.py"
        f.write_text(f.read_text()[:3000] + "\n(\n")  # cut mid-file: a syntax error
    else:  # a module that ends the process while the verdict is being made
        (lib / "console" / "core" / "decisions.py").write_text("raise SystemExit(0)\n")
    launcher.write_text(_LAUNCHER.format(version="test", lib=lib, log=root / "guard.log"))
    token = (fleet.root / "policies" / "web-1.jws").read_text().strip()
    p = subprocess.run([sys.executable, "-B", str(launcher), "web-1", "prepare", "begin", "-"],
                       input=domain_xml("web-1", WEB_UUID, token), env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert p.returncode == 1, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"escort-guard refused web-1: {code}: "), p.stderr
    assert [e["reason"] for e in _log(root)] == [code]
    # an operation the guard does not check still passes (libvirt must be able to stop VMs)
    q = subprocess.run([sys.executable, "-B", str(launcher), "--x", "stopped", "end", "-"], input="",
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert q.returncode == 0 and q.stderr == "", q.stderr


def test_a_large_domain_is_judged_by_its_policy(fleet: FleetFiles) -> None:
    """A 2 MiB <description> (anyone who may run `virsh desc` can set one) made the guard
    refuse the VM everywhere with "metadata XML is larger than 1024 KiB", although escort,
    which reads only the policy element, admitted it: the guard now reads only that element."""
    s = FleetService.load(fleet.fleet, at=T0)
    config, material = _plan(s, HOST)
    cert = (fleet.root / "certs" / f"{HOST}.pem").read_bytes()
    token = (fleet.root / "policies" / "web-1.jws").read_text().strip()
    small = guard_decide(domain_xml("web-1", WEB_UUID, token), cert, material, config, T0)
    desc = f"<description>{'x' * (2 << 20)}</description>"
    big = guard_decide(domain_xml("web-1", WEB_UUID, token, extra=desc), cert, material, config, T0)
    assert (big.allowed, big.codes) == (small.allowed, small.codes), big
    assert big.policy_digest == small.policy_digest != ""
    # a policy element with children is still refused, as escort refuses it
    bad = domain_xml("web-1", WEB_UUID, token).replace(f"{token}</", f"{token}<x/></")
    assert guard_decide(bad, cert, material, config, T0).code == "guard.xml_unusable"


def test_a_fifo_in_place_of_the_log_does_not_hang_the_hook(fleet: FleetFiles, tmp_path: Path) -> None:
    """Found on fra-2: with a FIFO at /var/log/libvirt/escort-guard.log every hook call
    blocked in open() (the verdict was made, then nothing), holding libvirt's start or
    migration for good. Now the entry is lost with a line on stderr; the verdict stands."""
    launcher, root, env = _launcher_on(tmp_path, fleet, HOST)
    os.mkfifo(root / "guard.log")
    token = (fleet.root / "policies" / "web-1.jws").read_text().strip()
    p = subprocess.run([sys.executable, str(launcher), "web-1", "prepare", "begin", "-"],
                       input=domain_xml("web-1", WEB_UUID, token), env=env, capture_output=True, text=True,
                       timeout=20, check=False)
    assert p.returncode == 0 and "cannot write" in p.stderr and p.stdout == "", p.stderr
