"""`escort hosts guard install|status|remove`: put the host guard on hypervisors over SSH.

What is pushed (docs/GUARD.md): a self-contained code bundle — ``console/core`` (the
decision code itself), ``console/guard`` (the hook runner), joserfc and the files of
the cryptography wheel this escort runs with (plus cffi's ``_cffi_backend``) — run by
the host's own ``/usr/bin/python3 -I -S``; the fleet's trust material (host CA tree
+ CRLs, owners' CAs + CRLs) and ``guard.json`` (host name, no-policy setting, the
UUIDs of VMs the fleet knows to carry a policy, and per VM the owner and highest
policy ``seq`` escort has seen, so the guard refuses rollbacks and owner swaps).
Nothing is downloaded on the host.
The installer (console/guard/remote.py, standard library only) runs over the
existing SSH connection with the tar.gz on stdin.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import py_compile
import shlex
import sys
import tarfile
import tempfile
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh

from console.adapters.files import load_trust_dir
from console.core.errors import EscortError, InputError
from console.core.guard import (
    GUARD_VERSION,
    GuardConfig,
    GuardMaterial,
    material_digest,
    merge_seen,
    seen_digest,
)
from console.core.inventory import HostSpec
from console.core.policy import SeenPolicy
from console.services.fleet import FleetService
from console.services.identity import AdminIdentity, append_signed, require_admin
from console.services.inventory import InventoryService, is_live

HOOK_PATH = "/etc/libvirt/hooks/qemu.d/escort-guard"
LIB_PATH = "/var/lib/libvirt/escort-guard/lib"
LOG_PATH = "/var/log/libvirt/escort-guard.log"
REMOTE_PYTHON = "/usr/bin/python3"
INSTALL_TIMEOUT_S = 180.0

_LAUNCHER = '''#!/usr/bin/python3 -IS
# escort-guard {version}: libvirt qemu hook installed by `escort hosts guard install`.
# Do not edit: re-run the install. Code: {lib}  Log: {log}
import sys
if len(sys.argv) > 3 and sys.argv[1][:2] != "--" and (sys.argv[2], sys.argv[3]) not in (
        ("migrate", "begin"), ("prepare", "begin"), ("restore", "begin")):
    sys.exit(0)
sys.path.insert(0, "{lib}")
try:
    from console.guard.hook import main
except BaseException as exc:
    name = sys.argv[1] if len(sys.argv) > 1 else "the domain"
    sys.stderr.write(f"escort-guard refused {{name}}: guard.broken: the guard's code does not load "
                     f"({{type(exc).__name__}}: {{exc}}); run `escort hosts guard install`\\n")
    sys.exit(1)
sys.exit(main(sys.argv))
'''


def launcher() -> bytes:
    return _LAUNCHER.format(version=GUARD_VERSION, lib=LIB_PATH, log=LOG_PATH).encode()


def _package_dir(module: str) -> Path:
    mod = __import__(module)
    return Path(mod.__file__).parent  # type: ignore[arg-type]


def _tree(root: Path, prefix: str) -> Iterable[tuple[str, Path]]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
            yield f"{prefix}/{path.relative_to(root).as_posix()}", path


@dataclass
class Bundle:
    """The code the hook runs: relative path -> bytes, and one digest over all of it."""

    files: dict[str, bytes]
    digest: str

    @classmethod
    def build(cls) -> Bundle:
        import _cffi_backend  # type: ignore[import-untyped]

        console_dir = Path(__file__).resolve().parent.parent
        files: dict[str, bytes] = {"console/__init__.py": (console_dir / "__init__.py").read_bytes()}
        for rel, path in _tree(console_dir / "core", "console/core"):
            if path.suffix == ".py":
                files[rel] = path.read_bytes()
        for name in ("__init__.py", "hook.py"):
            files[f"console/guard/{name}"] = (console_dir / "guard" / name).read_bytes()
        for pkg in ("joserfc", "cryptography"):
            for rel, path in _tree(_package_dir(pkg), pkg):
                files[rel] = path.read_bytes()
        backend = Path(_cffi_backend.__file__)
        files[backend.name] = backend.read_bytes()
        files.update(_compiled(files))
        h = hashlib.sha256()
        for rel in sorted(files):
            h.update(f"{rel}\0{len(files[rel])}\0".encode())
            h.update(files[rel])
        h.update(launcher())
        return cls(files, h.hexdigest())


def _compiled(files: dict[str, bytes]) -> dict[str, bytes]:
    """Byte code for every module, as unchecked-hash .pyc files (PEP 552).

    The host's python3 then imports without compiling (the hook must decide fast) and
    without checking source times (tar keeps none). A host python of another version
    ignores these files (other cache tag) and compiles in memory: slower, same result.
    """
    tag = sys.implementation.cache_tag
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="escort-guard-pyc-") as tmp:
        for rel, data in files.items():
            if not rel.endswith(".py"):
                continue
            src = Path(tmp) / "src.py"
            src.write_bytes(data)
            parent, _, name = rel.rpartition("/")
            where = f"{parent}/__pycache__" if parent else "__pycache__"
            target = f"{where}/{name[:-3]}.{tag}.pyc"
            cfile = Path(tmp) / "out.pyc"
            try:
                py_compile.compile(str(src), cfile=str(cfile), dfile=rel, doraise=True,
                                   invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
            except py_compile.PyCompileError:
                continue
            out[target] = cfile.read_bytes()
    return out


_BUNDLE: Bundle | None = None


def bundle() -> Bundle:
    global _BUNDLE
    if _BUNDLE is None:
        _BUNDLE = Bundle.build()
    return _BUNDLE


def _material(service: FleetService) -> GuardMaterial:
    """The fleet's trust directories, classified by content exactly as escort reads them."""
    spec = service.spec
    if spec is None:
        raise EscortError("no usable fleet is loaded")
    host_certs, host_crls, _ = load_trust_dir(spec.trust_dir)
    owner_certs, owner_crls, _ = load_trust_dir(spec.owners_trust_dir)

    def named(items: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        out = []
        for i, (_src, data) in enumerate(items):
            ext = "pem" if data.lstrip().startswith(b"-----") else "der"
            out.append((f"{i:03d}-{hashlib.sha256(data).hexdigest()[:12]}.{ext}", data))
        return out

    return GuardMaterial(named(host_certs), named(host_crls), named(owner_certs), named(owner_crls))


def policy_uuids(service: FleetService) -> frozenset[str]:
    """UUIDs of every VM the fleet knows to carry a policy (fleet file or live metadata)."""
    return frozenset(v.uuid for v in service.vms() if service.policy_token(v.uuid))


def policies_seen(service: FleetService) -> dict[str, SeenPolicy]:
    """Per VM the newest policy escort knows: its memory merged with every policy it
    accepts now (fleet file or live metadata; the service's own verdicts, so nothing is
    verified twice). The lab, which reads tokens from libvirt itself, gets the same from
    ``core.guard.seen_for_guard``."""
    now: dict[str, SeenPolicy] = {}
    for v in service.vms():
        if not service.policy_token(v.uuid):
            continue
        entry = service.policy(v.uuid).seen_entry()
        if entry is not None:
            now[v.uuid] = entry
    return merge_seen(service.policies_seen(), now)


@dataclass
class GuardPlan:
    """What `install` would push to one host, and its digest (also what `status` compares).

    ``digest`` covers the trust material and the configuration except the VM list,
    which `status` compares on its own (new VMs are normal; say how many are missing).
    """

    host: HostSpec
    config: GuardConfig
    material: GuardMaterial
    digest: str


def plan_for(service: FleetService, host: HostSpec, *, uuids: frozenset[str] | None = None,
             material: GuardMaterial | None = None, seen: dict[str, SeenPolicy] | None = None) -> GuardPlan:
    spec = service.spec
    assert spec is not None
    mode = host.guard_no_policy if host.guard_no_policy in ("admit", "refuse") else "admit"
    config = GuardConfig(host=host.name, no_policy=mode,  # type: ignore[arg-type]
                         policy_uuids=uuids if uuids is not None else policy_uuids(service),
                         policy_names=dict(spec.policy_names), host_cert=host.remote_cert,
                         fleet=spec.name, missing_crl=spec.missing_crl,
                         seen=seen if seen is not None else policies_seen(service))
    material = material or _material(service)
    return GuardPlan(host, config, material, material_digest(material, config))


def payload(plan: GuardPlan, *, with_code: bool) -> bytes:
    """The tar.gz the remote installer reads from stdin."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))

        if with_code:
            for rel, data in sorted(bundle().files.items()):
                add(f"lib/{rel}", data, 0o755 if rel.endswith(".so") else 0o644)
        conf = json.dumps(plan.config.as_json(plan.digest), indent=1, sort_keys=True).encode()
        add("conf/guard.json", conf)
        roles = zip(("host-certs", "host-crls", "owner-certs", "owner-crls"),
                    (plan.material.host_certs, plan.material.host_crls, plan.material.owner_certs,
                     plan.material.owner_crls), strict=True)
        for role, items in roles:
            dir_info = tarfile.TarInfo(f"conf/trust/{role}")
            dir_info.type, dir_info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(dir_info)
            for name, data in items:
                add(f"conf/trust/{role}/{name}", data)
        add("hook", launcher(), 0o755)
    return buf.getvalue()


def remote_command(action: str, *args: str) -> str:
    code = (Path(__file__).resolve().parent.parent / "guard" / "remote.py").read_text()
    return " ".join([REMOTE_PYTHON, "-I", "-S", "-c", shlex.quote(code), action, *map(shlex.quote, args)])


@dataclass
class GuardState:
    """One host's guard as `status` found it."""

    host: str
    state: str  # "current" | "stale" | "missing" | "broken" | "unreachable" | "not-live"
    version: str = ""
    trust_digest: str = ""  # computed by the guard on the host from what is on disk
    expected_digest: str = ""  # what escort would push now
    problem: str = ""
    missing_vms: int = 0  # VMs with a policy the guard does not know (a stripped copy would pass)
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"host": self.host, "state": self.state, "version": self.version,
                "trust_digest": self.trust_digest, "expected_digest": self.expected_digest,
                "expected_version": GUARD_VERSION, "problem": self.problem,
                "missing_vms": self.missing_vms}


class GuardService:
    """Install, inspect and remove the guard on a fleet's live hosts."""

    def __init__(self, service: FleetService, inventory: InventoryService | None = None) -> None:
        self.service = service
        self.inventory = inventory or InventoryService.for_fleet(service)
        self._uuids: frozenset[str] | None = None
        self._material: GuardMaterial | None = None
        self._seen: dict[str, SeenPolicy] | None = None

    def hosts(self, names: Iterable[str] = ()) -> list[HostSpec]:
        spec = self.service.spec
        if spec is None:
            raise EscortError("no usable fleet is loaded")
        wanted = list(names)
        known = {h.name: h for h in spec.hosts}
        for n in wanted:
            if n not in known:
                raise InputError(f"no host {n!r} in fleet {spec.name}")
        return [known[n] for n in wanted] if wanted else list(spec.hosts)

    def plan(self, host: HostSpec) -> GuardPlan:
        if self._material is None:
            self._material = _material(self.service)
        if self._uuids is None:
            self._uuids = policy_uuids(self.service)
        if self._seen is None:
            self._seen = policies_seen(self.service)
        return plan_for(self.service, host, uuids=self._uuids, material=self._material, seen=self._seen)

    async def _run(self, host: HostSpec, command: str, stdin: bytes | None = None,
                   timeout: float = 60.0) -> dict[str, Any]:
        conn = await self.inventory.pool.connect(host.ssh, host.jump, name=host.name)
        try:
            result = await conn.run(command, input=stdin, encoding=None, check=False, timeout=timeout)
        except (asyncssh.Error, OSError) as exc:
            raise EscortError(f"{host.name}: {exc}") from exc
        out = result.stdout if isinstance(result.stdout, bytes) else b""
        err = result.stderr if isinstance(result.stderr, bytes) else b""
        lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            first = (err.decode(errors="replace").strip().splitlines() or [f"exit {result.exit_status}"])[-1]
            raise EscortError(f"{host.name}: {first}")
        data = json.loads(lines[-1])
        if not isinstance(data, dict):
            raise EscortError(f"{host.name}: unexpected answer from the host")
        return data

    async def status_one(self, host: HostSpec) -> GuardState:
        if not is_live(host) or not host.ssh:
            return GuardState(host.name, "not-live", problem="no ssh in the fleet file (the guard needs it)")
        expected = self.plan(host).digest
        try:
            conn = await self.inventory.pool.connect(host.ssh, host.jump, name=host.name)
            result = await conn.run(f"test -x {HOOK_PATH} && {HOOK_PATH} --status", encoding=None,
                                    check=False, timeout=60)
        except (EscortError, asyncssh.Error, OSError) as exc:
            return GuardState(host.name, "unreachable", expected_digest=expected, problem=str(exc))
        out = result.stdout if isinstance(result.stdout, bytes) else b""
        if result.exit_status != 0 and not out.strip():
            return GuardState(host.name, "missing", expected_digest=expected,
                              problem=f"no guard hook at {HOOK_PATH}")
        try:
            data = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            return GuardState(host.name, "broken", expected_digest=expected,
                              problem="the guard hook did not answer --status")
        st = GuardState(host.name, "current", version=str(data.get("version", "")),
                        trust_digest=str(data.get("trust_digest", "")), expected_digest=expected,
                        details=data)
        if not data.get("ok"):
            st.state, st.problem = "broken", str(data.get("problem", "the guard reports a problem"))
        elif st.version != GUARD_VERSION:
            st.state, st.problem = "stale", f"guard version {st.version}, escort ships {GUARD_VERSION}"
        elif st.trust_digest != expected:
            st.state, st.problem = "stale", "its trust material differs from the fleet's"
        else:
            have = {str(u) for u in data.get("policy_uuids", []) if isinstance(u, str)}
            missing = self.plan(host).config.policy_uuids - have
            if missing:
                st.missing_vms = len(missing)
                st.state = "stale"
                st.problem = (f"{len(missing)} VM(s) that carry a policy are not on its list (a copy "
                              "stripped of its policy would be admitted)")
            elif str(data.get("seen_digest", "")) != seen_digest(self.plan(host).config.seen):
                st.state = "stale"
                st.problem = ("its list of the newest policy per VM differs from escort's (an older "
                              "policy, or another owner's, could be admitted)")
        return st

    async def status(self, names: Iterable[str] = ()) -> list[GuardState]:
        hosts = self.hosts(names)
        return list(await asyncio.gather(*(self.status_one(h) for h in hosts)))

    async def install_one(self, host: HostSpec, *, restart: bool = False) -> dict[str, Any]:
        if not is_live(host) or not host.ssh:
            return {"host": host.name, "ok": False,
                    "problem": "no ssh in the fleet file (the guard needs it)"}
        plan = self.plan(host)
        b = bundle()
        try:
            probe = await self._run(host, remote_command("probe"))
            with_code = probe.get("bundle") != f"v-{b.digest[:16]}"
            args = ["install", b.digest[:16], plan.digest[:16]] + (["--restart"] if restart else [])
            result = await self._run(host, remote_command(*args), payload(plan, with_code=with_code),
                                     timeout=INSTALL_TIMEOUT_S)
        except EscortError as exc:
            return {"host": host.name, "ok": False, "problem": str(exc)}
        result["host"] = host.name
        result["trust_digest"] = plan.digest
        return result

    async def _gated(self, action: str, kind: str, hosts: list[HostSpec], admin: str | None,
                     identity: AdminIdentity | None,
                     body: Callable[[], Awaitable[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
        """A changing action on hosts' guards: read-only check, proof of the acting admin's
        key (refusals audited), the action, then one signed audit entry with every result."""
        from console.adapters.audit import AuditLog
        from console.services.emergency import audit_path

        self.service.require_writable(action)
        audit = await asyncio.to_thread(AuditLog, audit_path(self.service))
        try:
            proof = await require_admin(self.service, action, admin=admin, identity=identity,
                                        audit=lambda e: asyncio.to_thread(audit.append, e))
            rows = await body()
            await append_signed(audit, {
                "kind": kind, "admin": proof.admin, "proof": proof.as_json(),
                "hosts": [{"host": r.get("host"), "ok": bool(r.get("ok")),
                           **({"problem": str(r["problem"])} if r.get("problem") else {})} for r in rows],
            }, proof)
            return rows
        finally:
            audit.close()

    async def install(self, names: Iterable[str] = (), *, restart: bool = False, admin: str | None = None,
                      identity: AdminIdentity | None = None) -> list[dict[str, Any]]:
        """Push the guard to hosts; first proves the operator holds the acting admin's key."""
        hosts = self.hosts(names)

        async def body() -> list[dict[str, Any]]:
            if self._seen is None:
                self._seen = policies_seen(self.service)
            # what the guards are told escort has seen, escort remembers too (status compares)
            self.service.remember_policies(self._seen)
            return list(await asyncio.gather(*(self.install_one(h, restart=restart) for h in hosts)))

        return await self._gated("install the host guard", "guard_install", hosts, admin, identity, body)

    async def remove(self, names: Iterable[str] = (), *, admin: str | None = None,
                     identity: AdminIdentity | None = None) -> list[dict[str, Any]]:
        """Remove the guard from hosts (weakens enforcement): proof of the admin's key first."""
        hosts = self.hosts(names)

        async def body() -> list[dict[str, Any]]:
            out = []
            for h in hosts:
                try:
                    r = await self._run(h, remote_command("remove"))
                except EscortError as exc:
                    r = {"ok": False, "problem": str(exc)}
                r["host"] = h.name
                out.append(r)
            return out

        return await self._gated("remove the host guard", "guard_remove", hosts, admin, identity, body)


__all__ = ["Bundle", "GuardPlan", "GuardService", "GuardState", "bundle", "launcher", "payload",
           "plan_for", "policies_seen", "policy_uuids", "remote_command"]
