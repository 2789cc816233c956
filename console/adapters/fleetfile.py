"""The fleet file (TOML) -> ``core.inventory.FleetSpec``; see docs/FLEET.md for the format.

Strict on purpose: an unknown key is far more often a typo (``trust-dir``,
``polcy_file``) than a feature, and a typo in a security configuration must not be
silently ignored. Every problem is one ``InputError`` line naming the file and the
key path (``fleet.toml: hosts[2].cert_file: expected a string, got an integer``).
Relative paths are resolved against the fleet file's directory, so a fleet folder
can be moved or checked out anywhere.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import rtoml

from console.adapters.files import read_limited
from console.core.errors import InputError
from console.core.grants import normalize_ssh_fingerprint
from console.core.inventory import AdminSpec, FleetKind, FleetSpec, HostSpec, VMSpec
from console.core.policy import normalize_fingerprint, normalize_uuid


@dataclass(frozen=True)
class _Key:
    kind: type | tuple[type, ...]
    required: bool = False
    path: bool = False  # a local path: resolved against the fleet file's directory
    check: Callable[[Any], Any] | None = None  # normalise or raise InputError

    @property
    def types(self) -> frozenset[type]:
        return _types(self.kind)


@functools.cache
def _types(kind: type | tuple[type, ...]) -> frozenset[type]:
    return frozenset(kind if isinstance(kind, tuple) else (kind,))


def _kind(value: str) -> str:
    kinds = get_args(FleetKind)
    if value not in kinds:
        raise InputError(f"must be one of {', '.join(kinds)}, not {value!r}")
    return value


def _name(value: str) -> str:
    if not value.strip():
        raise InputError("must not be empty")
    return value


def _missing_crl(value: str) -> str:
    if value not in ("refuse", "warn"):
        raise InputError(f"{value!r} is not one of refuse, warn")
    return value


def _guard_mode(value: str) -> str:
    if value not in ("admit", "refuse"):
        raise InputError(f"must be \"admit\" or \"refuse\", not {value!r}")
    return value


def _opt(fn: Callable[[str], str]) -> Callable[[str], str]:
    return lambda v: fn(v) if v else v


TOP: dict[str, _Key] = {
    "name": _Key(str, True, check=_name),
    "kind": _Key(str, True, check=_kind),
    "trust_dir": _Key(str, True, path=True),
    "owners_trust_dir": _Key(str, True, path=True),
    "known_hosts": _Key(str, path=True),
    "ssh_config": _Key(str, path=True),
    "identity_files": _Key(list, path=True),
    "audit_log": _Key(str, path=True),
    "readonly": _Key(bool),
    "stall_timeout_s": _Key((int, float)),
    "missing_crl": _Key(str, check=_missing_crl),
    "grants": _Key(list, path=True),
    "policy_names": _Key(dict),
    "hosts": _Key(list),
    "admins": _Key(list),
    "vms": _Key(list),
    "vm_files": _Key(list, path=True),
}
#: The fleet file and each of its ``vm_files`` may be this big (10,000 VMs in the
#: documented [[vms]] layout are ~1.6 MB); a bound against a wrong or hostile file.
FLEET_MAX_BYTES = 16 * 1024 * 1024
#: How many VMs all files together may list.
FLEET_MAX_VMS = 200_000
HOST: dict[str, _Key] = {
    "name": _Key(str, True, check=_name),
    "region": _Key(str),
    "ssh": _Key(str),
    "jump": _Key(str),
    "libvirt_uri": _Key(str),
    "cert_file": _Key(str, path=True),
    "remote_cert": _Key(str),  # a path on the host, not resolved locally
    "migration_address": _Key(str),
    "tls_name": _Key(str),
    "guard_no_policy": _Key(str, check=_guard_mode),
}
ADMIN: dict[str, _Key] = {
    "id": _Key(str, True, check=_name),
    "ssh_key_fingerprint": _Key(str, check=_opt(normalize_ssh_fingerprint)),
    "cert_fingerprint": _Key(str, check=_opt(normalize_fingerprint)),
}
VM: dict[str, _Key] = {
    "uuid": _Key(str, True, check=normalize_uuid),
    "name": _Key(str, True, check=_name),
    "host": _Key(str, True),
    "policy_file": _Key(str, path=True),
    "memory_mib": _Key(int),
    "vcpus": _Key(int),
}

_TYPE_WORDS = {str: "a string", bool: "true/false", int: "an integer", float: "a number",
               list: "a list", dict: "a table"}


def _type_word(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kinds)


def _value_word(value: Any) -> str:
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return _TYPE_WORDS[t]
    return type(value).__name__


class _Reader:
    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base
        self._base = str(base)

    def fail(self, where: str, message: str) -> InputError:
        return InputError(f"{self.source}: {where}: {message}")

    def resolve(self, value: str) -> str:
        if not value:
            return value
        if value.startswith("~"):
            value = os.path.expanduser(value)
        if value.startswith("/"):
            return value
        parts = value.split("/")
        if ".." in parts:
            return str((self.base / value).resolve())
        # The base is resolved already; joining spares 10,000 VMs' policy paths a
        # realpath() each (~0.2 ms apiece, once the larger part of parsing a big fleet).
        if "" in parts or "." in parts:
            return os.path.normpath(f"{self._base}/{value}")
        return f"{self._base}/{value}"

    def table(self, data: Any, schema: Mapping[str, _Key], where: str) -> dict[str, Any]:
        if type(data) is not dict:
            raise self.fail(where or "top level", f"expected a table, got {_value_word(data)}")
        for key in data:
            if key not in schema:
                known = ", ".join(sorted(schema))
                raise self.fail(f"{where}.{key}" if where else key, f"unknown key (known keys: {known})")
        out: dict[str, Any] = {}
        for key, spec in schema.items():
            if key not in data:
                if spec.required:
                    raise self.fail(f"{where}.{key}" if where else key, "missing (required)")
                continue
            value = data[key]
            # exact types: TOML parsers return plain builtins, and a boolean must never
            # pass as a number (bool is an int to isinstance)
            if type(value) not in spec.types:
                raise self.fail(f"{where}.{key}" if where else key,
                                f"expected {_type_word(spec.kind)}, got {_value_word(value)}")
            if spec.check is not None:
                try:
                    value = spec.check(value)
                except InputError as exc:
                    raise self.fail(f"{where}.{key}" if where else key, str(exc)) from exc
            if spec.path:
                if type(value) is list:
                    for i, item in enumerate(value):
                        if type(item) is not str:
                            raise self.fail(f"{where}.{key}[{i}]" if where else f"{key}[{i}]",
                                            f"expected a string, got {_value_word(item)}")
                    value = tuple(self.resolve(v) for v in value)
                else:
                    value = self.resolve(value)
            out[key] = value
        return out

    def rows(self, data: dict[str, Any], key: str, schema: Mapping[str, _Key]) -> list[dict[str, Any]]:
        return [self.table(item, schema, f"{key}[{i}]") for i, item in enumerate(data.get(key, []))]


def _toml(text: str, source: str) -> dict[str, Any]:
    # rtoml (Rust) parses a 10,000-VM fleet ~8x faster than tomllib (0.07 vs 0.6 s here)
    try:
        raw = rtoml.loads(text)
    except Exception as exc:  # rtoml.TomlParsingError, or anything else odd input provokes
        detail = " ".join(str(exc).split())
        raise InputError(f"{source}: not valid TOML ({detail})") from exc
    if not isinstance(raw, dict):
        raise InputError(f"{source}: not a TOML document")
    return raw


def parse_fleet(text: str, source: str, base_dir: str | os.PathLike[str],
                read_vm_files: Callable[[str], list[tuple[str, str]]] | None = None) -> FleetSpec:
    """Parse fleet TOML text; ``base_dir`` anchors relative paths.

    ``read_vm_files(entry) -> [(text, source)]`` reads one ``vm_files`` entry (a file,
    or a directory of them); without it, ``vm_files`` is an error.
    """
    reader = _Reader(source, Path(base_dir).resolve())
    raw = _toml(text, source)
    top = reader.table(raw, TOP, "")
    names = top.get("policy_names", {})
    for key, value in names.items():
        if not isinstance(value, str):
            raise reader.fail(f"policy_names.{key}",
                              f"expected a dotted OID string, got {_value_word(value)}")
        if not all(part.isdigit() for part in value.split(".")) or value.count(".") < 1:
            raise reader.fail(f"policy_names.{key}", f"{value!r} is not a dotted OID")
    hosts = [HostSpec(**row) for row in reader.rows(raw, "hosts", HOST)]
    admins = [AdminSpec(**row) for row in reader.rows(raw, "admins", ADMIN)]
    vms = [VMSpec(**row) for row in reader.rows(raw, "vms", VM)]
    if len(vms) > FLEET_MAX_VMS:
        raise reader.fail("vms", f"more than {FLEET_MAX_VMS:,} VMs (the limit); "
                          "split the fleet into several fleet files")
    for entry in top.get("vm_files", ()):
        if read_vm_files is None:
            raise reader.fail("vm_files", "only a fleet file on disk can name vm_files")
        for vm_text, vm_source in read_vm_files(entry):
            extra = _toml(vm_text, vm_source)
            vm_reader = _Reader(vm_source, Path(vm_source).parent.resolve())
            vm_reader.table(extra, {"vms": _Key(list, True)}, "")
            vms += [VMSpec(**row) for row in vm_reader.rows(extra, "vms", VM)]
            if len(vms) > FLEET_MAX_VMS:
                raise InputError(f"{vm_source}: more than {FLEET_MAX_VMS:,} VMs in the fleet "
                                 "(the limit); split the fleet into several fleet files")
    _unique(reader, "hosts", [h.name for h in hosts], "name")
    _unique(reader, "admins", [a.id for a in admins], "id")
    _unique(reader, "vms", [v.uuid for v in vms], "uuid")
    host_names = {h.name for h in hosts}
    for i, v in enumerate(vms):
        if v.host and v.host not in host_names:
            raise reader.fail(f"vms[{i}].host", f"{v.host!r} is not one of the [[hosts]]")
    return FleetSpec(
        name=top["name"],
        kind=top["kind"],
        base_dir=str(reader.base),
        trust_dir=top["trust_dir"],
        owners_trust_dir=top["owners_trust_dir"],
        known_hosts=top.get("known_hosts", ""),
        ssh_config=top.get("ssh_config", ""),
        identity_files=top.get("identity_files", ()),
        audit_log=top.get("audit_log", ""),
        policy_names=dict(names),
        hosts=tuple(hosts),
        admins=tuple(admins),
        grant_files=top.get("grants", ()),
        vms=tuple(vms),
        readonly=top.get("readonly", False),
        stall_timeout_s=float(top.get("stall_timeout_s", 30.0)),
        missing_crl=top.get("missing_crl", "refuse"),
    )


def _unique(reader: _Reader, table: str, values: list[str], key: str) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise reader.fail(f"{table}[{i}].{key}", f"{value!r} appears twice")
        seen.add(value)


def _read_text(p: Path, what: str) -> str:
    try:
        data = read_limited(p, what=what, limit=FLEET_MAX_BYTES)
    except InputError as exc:
        if "larger than" not in str(exc):
            raise
        raise InputError(
            f"{p}: larger than {FLEET_MAX_BYTES // (1024 * 1024)} MiB (the limit for a {what}); "
            "move [[vms]] into several files named by vm_files = [\"vms/\"] (see docs/FLEET.md)"
        ) from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: not UTF-8 text, so not a {what}") from exc


def _read_vm_files(entry: str) -> list[tuple[str, str]]:
    """One ``vm_files`` entry: a TOML file, or a directory standing for its *.toml files."""
    d = Path(entry)
    if not d.is_dir():
        return [(_read_text(d, "VM list file"), entry)]
    try:
        files = sorted(f for f in d.iterdir()
                       if f.suffix == ".toml" and not f.name.startswith(".") and f.is_file())
    except OSError as exc:
        raise InputError(f"{d}: cannot list ({exc.strerror or exc})") from exc
    if not files:
        raise InputError(f"{d}: no *.toml files in this vm_files directory")
    return [(_read_text(f, "VM list file"), str(f)) for f in files]


def load_fleet(path: str | os.PathLike[str]) -> FleetSpec:
    """Read and parse a fleet file and its ``vm_files`` (bounded reads; one-line InputError
    on any problem)."""
    p = Path(path)
    return parse_fleet(_read_text(p, "fleet file"), str(p), p.parent, _read_vm_files)


__all__ = ["FLEET_MAX_BYTES", "FLEET_MAX_VMS", "load_fleet", "parse_fleet"]
