"""The escort guard as libvirt runs it: ``qemu.d/escort-guard NAME OP SUBOP EXTRA``.

This module runs ON THE HYPERVISOR, under Debian's ``/usr/bin/python3 -I -S``, from
the bundle `escort hosts guard install` pushed (console/core + joserfc + the
cryptography wheel's files). It may import only the standard library and
``console.core``; the verdict itself is ``console.core.guard.guard_decide``, i.e.
escort's own decision code.

Files on the host (see docs/GUARD.md):

* ``/etc/libvirt/escort-guard/current/guard.json`` and ``.../current/trust/{host-certs,
  host-crls,owner-certs,owner-crls}/`` — the pushed configuration and trust material;
* ``/var/log/libvirt/escort-guard.log`` — one JSON line per verdict (also sent to
  syslog with the tag ``escort-guard`` when a syslog socket exists);
* stdout stays empty: for ``migrate``/``restore`` libvirt would take anything printed
  there as a replacement domain XML.

Exit 0 admits; exit 1 with ONE line on stderr refuses (libvirt ends its error with it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CONF_DIR = Path(os.environ.get("ESCORT_GUARD_CONF", "/etc/libvirt/escort-guard/current"))
LOG_FILE = Path(os.environ.get("ESCORT_GUARD_LOG", "/var/log/libvirt/escort-guard.log"))
ROLES = ("host-certs", "host-crls", "owner-certs", "owner-crls")
MAX_FILE = 1024 * 1024


def _read_dir(d: Path) -> list[tuple[str, bytes]]:
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        with f.open("rb") as fh:
            data = fh.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise OSError(f"{f}: larger than 1 MiB")
        out.append((f.name, data))
    return out


def load(conf_dir: Path = CONF_DIR) -> tuple[Any, Any, str]:
    """(GuardConfig, GuardMaterial, digest recorded by escort); raises OSError/InputError."""
    from console.core.guard import GuardConfig, GuardMaterial

    raw = (conf_dir / "guard.json").read_bytes()
    config, recorded = GuardConfig.parse(raw)
    trust = conf_dir / "trust"
    if not trust.is_dir():
        raise OSError(f"{trust}: no such directory")
    parts = [_read_dir(trust / role) for role in ROLES]
    return config, GuardMaterial(*parts), recorded


def _log(entry: dict[str, Any]) -> None:
    line = json.dumps(entry, sort_keys=True)
    try:
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        sys.stderr.write(f"escort-guard: cannot write {LOG_FILE}: {exc}\n")
    try:
        import syslog

        syslog.openlog("escort-guard", syslog.LOG_PID, syslog.LOG_DAEMON)
        level = syslog.LOG_INFO if entry.get("verdict") == "admitted" else syslog.LOG_WARNING
        syslog.syslog(level, " ".join(f"{k}={entry[k]}" for k in
                                      ("verdict", "op", "vm", "uuid", "policy_digest", "source", "reason")
                                      if k in entry) + f" msg={entry.get('message', '')!r}")
    except Exception:  # no syslog socket (the lab): the file above is the record
        pass


def _now() -> dt.datetime:
    fixed = os.environ.get("ESCORT_GUARD_AT", "")  # tests only: decide as of this time
    if fixed:
        return dt.datetime.fromisoformat(fixed.replace("Z", "+00:00"))
    return dt.datetime.now(dt.UTC)


def decide_stdin(name: str, op: str, sub: str, source: str, xml: str) -> tuple[int, str, dict[str, Any]]:
    """The verdict for one hook call: (exit code, stderr line, log entry)."""
    t0 = time.monotonic()
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    entry: dict[str, Any] = {"at": stamp,
                             "op": f"{op} {sub}", "vm": name, "source": source}
    try:
        from console.core.errors import InputError
        from console.core.guard import GUARD_VERSION, guard_decide

        entry["guard_version"] = GUARD_VERSION
        try:
            config, material, _recorded = load()
        except (OSError, InputError, ValueError) as exc:
            line = (f"escort-guard refused {name}: guard.trust_unusable: the guard cannot read its "
                    f"configuration or trust material ({exc}); run `escort hosts guard install`")
            entry.update(verdict="refused", reason="guard.trust_unusable", message=str(exc))
            return 1, line, entry
        try:
            host_cert = Path(config.host_cert).read_bytes()[: MAX_FILE + 1]
        except OSError as exc:
            host_cert = b""
            entry["host_cert_error"] = str(exc)
        verdict = guard_decide(xml, host_cert, material, config, _now())
    except Exception as exc:  # fail closed, one line, never a traceback at libvirt
        line = f"escort-guard refused {name}: guard.internal: the guard failed ({type(exc).__name__}: {exc})"
        entry.update(verdict="refused", reason="guard.internal", message=str(exc))
        return 1, " ".join(line.split()), entry
    entry.update(verdict="admitted" if verdict.allowed else "refused", uuid=verdict.vm_uuid,
                 policy_digest=verdict.policy_digest, reason=verdict.code,
                 reasons=list(verdict.codes), message=verdict.message,
                 ms=round((time.monotonic() - t0) * 1000, 1))
    if verdict.vm_name:
        entry["vm"] = verdict.vm_name
    return (0, "", entry) if verdict.allowed else (1, verdict.line(), entry)


def status() -> dict[str, Any]:
    """What `escort hosts guard status` shows: version and the digest of what is on disk."""
    out: dict[str, Any] = {"hook": sys.argv[0], "log": str(LOG_FILE), "conf": str(CONF_DIR)}
    try:
        import cryptography

        from console.core.guard import GUARD_VERSION, material_digest, vms_digest

        out["version"] = GUARD_VERSION
        out["cryptography"] = cryptography.__version__
        out["python"] = sys.version.split()[0]
        config, material, recorded = load()
        out["trust_digest"] = material_digest(material, config)
        out["recorded_digest"] = recorded
        out["host"] = config.host
        out["no_policy"] = config.no_policy
        out["vms_digest"] = vms_digest(config.policy_uuids)
        out["policy_uuids"] = sorted(config.policy_uuids)
        out["ok"] = out["trust_digest"] == recorded
        if not out["ok"]:
            out["problem"] = "the trust material on disk differs from what escort pushed"
    except Exception as exc:
        out["ok"] = False
        out["problem"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv: list[str]) -> int:
    args = argv[1:]
    if args[:1] == ["--status"]:
        sys.stdout.write(json.dumps(status(), sort_keys=True) + "\n")
        return 0
    source = "libvirt"
    if args[:1] == ["--dry-run"]:  # bench and operators: decide on an XML file, log as dry-run
        source, args = "dry-run", args[1:]
    if len(args) < 3:
        sys.stderr.write("escort-guard: usage: escort-guard NAME OP SUBOP [EXTRA] (libvirt qemu hook)\n")
        return 2
    name, op, sub = args[0], args[1], args[2]
    from console.core.guard import CHECKED_OPS

    kind = CHECKED_OPS.get((op, sub))
    if kind is None:
        return 0
    if source == "libvirt":
        source = kind
    xml = sys.stdin.read(4 * 1024 * 1024 + 1)
    code, line, entry = decide_stdin(name, op, sub, source, xml)
    _log(entry)
    if code:
        sys.stderr.write(line + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
