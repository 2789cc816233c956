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
* ``/var/lib/libvirt/escort-guard-state/seen.json`` — the guard's own memory: per VM
  the owner and highest policy ``seq`` it admitted on this host (written atomically
  under ``flock``; kept by `escort hosts guard remove`), so a policy rolled back after
  it was admitted here is refused even if escort never saw the newer one;
* stdout stays empty: for ``migrate``/``restore`` libvirt would take anything printed
  there as a replacement domain XML.

Exit 0 admits; exit 1 with ONE line on stderr refuses (libvirt ends its error with it).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

CONF_DIR = Path(os.environ.get("ESCORT_GUARD_CONF", "/etc/libvirt/escort-guard/current"))
LOG_FILE = Path(os.environ.get("ESCORT_GUARD_LOG", "/var/log/libvirt/escort-guard.log"))
MEMORY_FILE = Path(os.environ.get("ESCORT_GUARD_SEEN", "/var/lib/libvirt/escort-guard-state/seen.json"))
MAX_MEMORY = 64 * 1024 * 1024
ROLES = ("host-certs", "host-crls", "owner-certs", "owner-crls")
MAX_FILE = 1024 * 1024


MAX_CONFIG = 64 * 1024 * 1024  # guard.json: ~3.3 MB at 10,000 VMs (its `seen`)
#: how long an admitting hook waits for the memory file's lock before it gives up recording
LOCK_WAIT_S = 5.0


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (symlinks followed) of at most ``limit``
    bytes; OSError otherwise. Opened non-blocking, so a FIFO cannot hang the hook (libvirt
    waits for a hook without any timeout) and a device such as /dev/zero cannot fill memory."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(f"{path}: larger than {limit // (1024 * 1024)} MiB")
    return b"".join(chunks)


def _read_dir(d: Path) -> list[tuple[str, bytes]]:
    if not d.is_dir():
        return []
    out = []
    for f in sorted(d.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        out.append((f.name, read_regular(f, MAX_FILE)))
    return out


def load(conf_dir: Path = CONF_DIR) -> tuple[Any, Any, str]:
    """(GuardConfig, GuardMaterial, digest recorded by escort); raises OSError/InputError."""
    from console.core.guard import GuardConfig, GuardMaterial

    raw = read_regular(conf_dir / "guard.json", MAX_CONFIG)
    config, recorded = GuardConfig.parse(raw)
    trust = conf_dir / "trust"
    if not trust.is_dir():
        raise OSError(f"{trust}: no such directory")
    parts = [_read_dir(trust / role) for role in ROLES]
    return config, GuardMaterial(*parts), recorded


def read_memory(path: Path | None = None) -> dict[str, Any]:
    """What this guard admitted before ({uuid: SeenPolicy}); {} when there is no file yet.

    A file that cannot be read or parsed raises (the caller refuses: fail closed).
    """
    from console.core.guard import parse_memory

    path = path or MEMORY_FILE
    try:
        data = read_regular(path, MAX_MEMORY)
    except FileNotFoundError:
        return {}
    return parse_memory(data, str(path))


def remember(uuid: str, entry: Any, path: Path | None = None) -> bool:
    """Record one admitted policy (SeenPolicy) for its VM when it is newer than what the
    file holds: re-read under an exclusive lock, merge, write a temporary file, fsync,
    rename. Returns whether the file changed."""
    import fcntl

    from console.core.guard import memory_bytes, merge_seen

    path = path or MEMORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_suffix(".lock"), "a") as lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:  # never wait forever: libvirt would wait with us, holding the domain's job
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(f"{path}: still locked after {LOCK_WAIT_S:.0f} s, not recorded") from None
                time.sleep(0.02)
        current = read_memory(path)
        merged = merge_seen(current, {uuid: entry})
        if merged.get(uuid) == current.get(uuid):
            return False
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, memory_bytes(merged))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return True


def _log(entry: dict[str, Any]) -> None:
    line = json.dumps(entry, sort_keys=True)
    try:
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        # non-blocking: a FIFO put in the log's place would otherwise block the open until
        # a reader came, and libvirt (no timeout) with it; without a reader this is ENXIO
        fd = os.open(LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_NOCTTY, 0o640)
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
            remembered = read_memory()
        except (OSError, InputError) as exc:
            line = (f"escort-guard refused {name}: guard.memory_unusable: the guard's memory of the "
                    f"policies it admitted cannot be read ({exc}); move {MEMORY_FILE} aside (the guard "
                    "then relies on what escort pushed)")
            entry.update(verdict="refused", reason="guard.memory_unusable", message=str(exc))
            return 1, " ".join(line.split()), entry
        cert_error = ""
        try:
            host_cert = read_regular(Path(config.host_cert), MAX_FILE)
        except OSError as exc:
            host_cert, cert_error = b"", str(exc)
            entry["host_cert_error"] = cert_error
        verdict = guard_decide(xml, host_cert, material, config, _now(), remembered, cert_error)
        if verdict.allowed and verdict.seen is not None:
            try:
                if remember(verdict.vm_uuid, verdict.seen):
                    entry["remembered_seq"] = verdict.seen.seq
            except (OSError, InputError) as exc:  # admitted rightly; only the memory is behind
                entry["memory_error"] = str(exc)
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

        from console.core.guard import GUARD_VERSION, material_digest, seen_digest, vms_digest

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
        out["seen_digest"] = seen_digest(config.seen)
        out["seen_vms"] = len(config.seen)
        out["memory"] = str(MEMORY_FILE)
        try:
            out["remembered_vms"] = len(read_memory())
        except Exception as exc:
            out["ok"] = False
            out["problem"] = f"the guard's memory {MEMORY_FILE} is unusable: {exc}"
            return out
        out["ok"] = out["trust_digest"] == recorded
        if not out["ok"]:
            out["problem"] = "the trust material on disk differs from what escort pushed"
    except Exception as exc:
        out["ok"] = False
        out["problem"] = f"{type(exc).__name__}: {exc}"
    return out


def main(argv: list[str]) -> int:
    """libvirt calls ``NAME OP SUBOP EXTRA`` (four arguments, EXTRA "-" for qemu hooks).

    A domain may be NAMED ``--status`` or ``--dry-run`` (libvirt allows it, and ``virsh
    migrate --dname`` renames on the way): the operator forms are therefore recognised
    only by their exact shape — ``--status`` alone, ``--dry-run NAME OP SUBOP EXTRA``
    (five arguments) — and any other call is libvirt's, its first argument the name.
    (Before, a VM named ``--dry-run`` or ``--status`` started anywhere unchecked.)
    """
    args = argv[1:]
    if args == ["--status"]:
        sys.stdout.write(json.dumps(status(), sort_keys=True) + "\n")
        return 0
    source = "libvirt"
    if len(args) >= 5 and args[0] == "--dry-run":  # bench and operators: decide on an XML file
        source, args = "dry-run", args[1:]
    if len(args) < 3:
        sys.stderr.write("escort-guard: usage: escort-guard NAME OP SUBOP EXTRA (libvirt qemu hook), "
                         "--status, or --dry-run NAME OP SUBOP EXTRA\n")
        return 2
    name, op, sub = args[0], args[1], args[2]
    try:
        from console.core.guard import CHECKED_OPS

        kind = CHECKED_OPS.get((op, sub))
    except BaseException as exc:  # a damaged bundle: one line and a log entry, never a traceback
        if (op, sub) not in FALLBACK_CHECKED_OPS:
            return 0
        return _refused(name, op, sub, source, "guard.broken",
                        f"the guard's code does not load ({type(exc).__name__}: {exc}); "
                        "run `escort hosts guard install`")
    if kind is None:
        return 0
    if source == "libvirt":
        source = kind
    try:
        xml = sys.stdin.read(4 * 1024 * 1024 + 1)
        code, line, entry = decide_stdin(name, op, sub, source, xml)
    except BaseException as exc:  # SystemExit/KeyboardInterrupt from a damaged bundle: refuse too
        return _refused(name, op, sub, source, "guard.internal",
                        f"the guard failed ({type(exc).__name__}: {exc})")
    _log(entry)
    if code:
        sys.stderr.write(line + "\n")
    return code


#: what the launcher checks (console/services/guard.py) = core.guard.CHECKED_OPS, for when
#: the core cannot be imported (a test keeps the three equal)
FALLBACK_CHECKED_OPS = frozenset({("migrate", "begin"), ("prepare", "begin"), ("restore", "begin")})


def _refused(name: str, op: str, sub: str, source: str, code: str, message: str) -> int:
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    _log({"at": stamp, "op": f"{op} {sub}", "vm": name, "source": source, "verdict": "refused",
          "reason": code, "message": message})
    sys.stderr.write(" ".join(f"escort-guard refused {name}: {code}: {message}".split())[:1000] + "\n")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
