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
import gc
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from operator import itemgetter, methodcaller
from pathlib import Path
from typing import Any, NamedTuple, get_args

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


#: Largest count that makes sense for memory (MiB) or vCPUs; bigger is a typo or an attack.
MAX_COUNT = 2**40
MAX_STALL_TIMEOUT_S = 86400.0


def _count(value: int) -> int:
    if not 0 <= value <= MAX_COUNT:
        raise InputError(f"must be between 0 and {MAX_COUNT}, not {value}")
    return value


def _timeout(value: float) -> float:
    if not math.isfinite(value) or not 0 < value <= MAX_STALL_TIMEOUT_S:
        raise InputError(f"must be a number of seconds above 0 and at most {MAX_STALL_TIMEOUT_S:.0f}, "
                         f"not {value}")
    return value


_OID = re.compile(r"^[0-2](?:\.(?:0|[1-9][0-9]{0,18})){1,31}$", re.ASCII)


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
    "stall_timeout_s": _Key((int, float), check=_timeout),
    "missing_crl": _Key(str, check=_missing_crl),
    "grants": _Key(list, path=True),
    "policy_names": _Key(dict),
    "hosts": _Key(list),
    "admins": _Key(list),
    "vms": _Key(list),
    "vm_files": _Key(list, path=True),
}
#: The fleet file and each of its ``vm_files`` may be this big: 10,000 VMs in the
#: documented [[vms]] layout are ~1.6 MB, and the costliest TOML of this size (a table
#: header on every line) takes the parser about half a second here (fuzz/RESULTS.md),
#: so no single file of allowed size takes more than a second. Bigger fleets are split
#: with ``vm_files`` (docs/FLEET.md).
FLEET_MAX_BYTES = 2 * 1024 * 1024
#: All files of one fleet together (the fleet file and every ``vm_files`` file).
FLEET_MAX_TOTAL_BYTES = 64 * 1024 * 1024
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
    "host": _Key(str, True, check=_name),
    "policy_file": _Key(str, path=True),
    "memory_mib": _Key(int, check=_count),
    "vcpus": _Key(int, check=_count),
}

_VM_KEYS = frozenset(VM)
_VM_REQUIRED = frozenset(k for k, spec in VM.items() if spec.required)
#: What ``normalize_uuid`` returns unchanged (anything else goes the slow, exact way).
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")

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


def _printable(text: str, limit: int = 80) -> str:
    """A key path as it can be shown on one line: control characters escaped, length capped."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return shown + "…" if len(text) > limit else shown


class _Reader:
    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base
        self._base = str(base)
        self.realpath = False  # a path was resolved through the file system (``..``)

    def fail(self, where: str, message: str) -> InputError:
        return InputError(f"{self.source}: {_printable(where)}: {message}")

    def resolve(self, value: str) -> str:
        if not value:
            return value
        if value.startswith("~"):
            value = os.path.expanduser(value)
        if value.startswith("/"):
            return value
        parts = value.split("/")
        if ".." in parts:
            self.realpath = True  # depends on symbolic links as they are now: never cached
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
            bad = _nul_in(value)
            if bad is not None:
                raise self.fail((f"{where}.{key}" if where else key) + bad, "contains a NUL character")
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

    def vms(self, items: list[Any], key: str = "vms") -> list[VMSpec]:
        """``[[vms]]`` rows as ``table(item, VM)`` reads them, ~5x faster for rows that
        need nothing but the checks (canonical UUID, plain strings, counts in range):
        10,000 of them are most of a big fleet file. Any other row goes through
        ``table``, which normalises it or raises its one-line error."""
        out: list[VMSpec] = []
        resolve, canonical, keys, required = self.resolve, _CANONICAL_UUID.match, _VM_KEYS, _VM_REQUIRED
        for i, item in enumerate(items):
            if type(item) is dict and required <= item.keys() <= keys:
                u, n, h = item["uuid"], item["name"], item["host"]
                pf, m, c = item.get("policy_file", ""), item.get("memory_mib", 0), item.get("vcpus", 0)
                if (type(u) is str and type(n) is str and type(h) is str and type(pf) is str
                        and type(m) is int and type(c) is int and 0 <= m <= MAX_COUNT and 0 <= c <= MAX_COUNT
                        and canonical(u) and n.strip() and h.strip()
                        and "\0" not in n and "\0" not in h and "\0" not in pf):
                    out.append(VMSpec(u, n, h, resolve(pf), m, c))
                    continue
            out.append(VMSpec(**self.table(item, VM, f"{key}[{i}]")))
        return out

    def vm_rows(self, items: list[Any], key: str = "vms") -> _Columns:
        """Every row checked as ``vms`` checks it; returns the columns of all rows (uuids,
        names, hosts, resolved policy files, memory, vcpus).

        Rows that all pass the fast checks are checked a column at a time at C speed
        (``_vm_columns``); otherwise the row-by-row path says exactly what is wrong."""
        cols = _vm_columns(items)
        if cols is None:
            specs = self.vms(items, key)
            return ([v.uuid for v in specs], [v.name for v in specs], [v.host for v in specs],
                    [v.policy_file for v in specs], [v.memory_mib for v in specs], [v.vcpus for v in specs])
        uuids, names, hosts, files, mems, cpus = cols
        return uuids, names, hosts, list(map(self.resolve, files)), mems, cpus


#: (uuids, names, hosts, policy files, memory, vcpus): one list per column, a row per VM
_Columns = tuple[list[str], list[str], list[str], list[str], list[int], list[int]]
#: a parsed fleet: the spec without VMs, and the VMs' columns
_Parsed = tuple[FleetSpec, _Columns]


_UUID_DASHES = (8, 13, 18, 23)
_UUID_CHARS = b"0123456789abcdef-"


def _vm_columns(items: list[Any]) -> tuple[list[str], list[str], list[str], list[str], list[int],
                                           list[int]] | None:
    """(uuids, names, hosts, policy files, memory, vcpus) when every row passes the fast
    checks of ``_Reader.vms`` -- each check over a whole column with C-speed builtins --
    else None (then the rows are read one by one, which names the problem)."""
    if not items:
        return [], [], [], [], [], []
    if set(map(type, items)) != {dict}:
        return None
    for keys in set(map(frozenset, items)):
        if not _VM_REQUIRED <= keys <= _VM_KEYS:
            return None
    uuids = list(map(itemgetter("uuid"), items))
    names = list(map(itemgetter("name"), items))
    hosts = list(map(itemgetter("host"), items))
    files = list(map(methodcaller("get", "policy_file", ""), items))
    mems = list(map(methodcaller("get", "memory_mib", 0), items))
    cpus = list(map(methodcaller("get", "vcpus", 0), items))
    texts = uuids + names + hosts + files
    counts = mems + cpus
    if (set(map(type, texts)) != {str} or set(map(type, counts)) != {int}
            or min(counts) < 0 or max(counts) > MAX_COUNT or "\0" in "".join(texts)
            or "" in set(map(str.strip, names)) or "" in set(map(str.strip, hosts))):
        return None
    # canonical UUIDs (what normalize_uuid returns unchanged): 36 characters, dashes at
    # 8, 13, 18 and 23 and nowhere else, lowercase hex digits everywhere else
    if set(map(len, uuids)) != {36}:
        return None
    joined = "".join(uuids)
    if not joined.isascii() or joined.count("-") != 4 * len(uuids) \
            or any(joined[i::36].strip("-") for i in _UUID_DASHES) \
            or joined.encode("ascii").translate(None, _UUID_CHARS):
        return None
    return uuids, names, hosts, files, mems, cpus


def _nul_in(value: Any) -> str | None:
    """Where a NUL character hides in a string value ("" for the value itself), else None."""
    if isinstance(value, str):
        return "" if "\0" in value else None
    if isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str) and "\0" in item:
                return f"[{i}]"
    return None


#: Bounds checked on the raw text *before* the TOML parser runs, in linear time: deep
#: nesting (tomllib: RecursionError past ~1000 levels), dotted keys of thousands of
#: parts (tomllib: O(n**2), a 40 KB key took 18 s) and integers of thousands of digits
#: (ValueError past 4300) are refused whichever parser is used. A fleet file needs
#: none of them: its deepest value is an array of tables, its longest key has three parts.
MAX_TOML_DEPTH = 16
MAX_KEY_PARTS = 16
MAX_DIGITS = 40
#: Strings and comments, blanked (on the few suspicious lines only) before a bound is measured.
_TOML_SKIP = re.compile(
    r'"""[\s\S]*?"""|\'\'\'[\s\S]*?\'\'\'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"|\'[^\'\n]*\'|#[^\n]*')
_KEY_PART = r'(?:[\w-]+|"")'
_TOML_DOTTED = re.compile(rf'(?<![\w"-]){_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART}){{{MAX_KEY_PARTS}}}')
#: MAX_KEY_PARTS dots on one line: the only place a too-long dotted key can be.
_MANY_DOTS = re.compile(rb"^(?:[^.\n]*+\.){" + str(MAX_KEY_PARTS).encode() + rb"}", re.M)
_TOML_DIGITS = re.compile(rb"[0-9](?:_?[0-9]){" + str(MAX_DIGITS).encode() + rb"}")
#: ``bytes.translate`` tables: brackets become parentheses, everything else goes;
#: digits become "1", everything else "0" (underscores, TOML's digit separator, go).
_TO_PARENS = bytes.maketrans(b"[{]}", b"(())")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_NOT_DOTS = bytes(c for c in range(256) if c not in b".\n")
_DIGITS_TO_1 = bytes(0x31 if chr(c).isdigit() and c < 128 else 0x30 for c in range(256))
_LONG_RUN = b"1" * (MAX_DIGITS + 1)


def _nesting_exceeds(raw: bytes, limit: int) -> bool:
    """Whether brackets nest deeper than ``limit``: each pass removes the innermost pairs
    (``bytes.replace``, C speed), so ``limit`` passes clear every shallower nesting."""
    b = raw.translate(_TO_PARENS, _NOT_BRACKETS)
    if b"(" * (limit + 1) in b:  # the common attack, found by one fast search
        return True
    for _ in range(limit):
        shorter = b.replace(b"()", b"")
        if len(shorter) == len(b):
            return False  # nothing left that nests (unbalanced leftovers are the parser's to report)
        b = shorter
    return b"()" in b


def _lines_of(raw: bytes, matches: Iterator[re.Match[bytes]]) -> Iterator[str]:
    """Each line holding a match, once (many matches on one long line cost one look)."""
    done = -1
    for m in matches:
        if m.start() <= done:
            continue
        start = raw.rfind(b"\n", 0, m.start()) + 1
        end = raw.find(b"\n", m.start())
        done = end if end >= 0 else len(raw)
        yield raw[start:done].decode("utf-8", "replace")


def _precheck(text: str, source: str) -> None:
    """Refuse, in linear time, TOML that would make the parser slow or crash.

    Measured on the raw bytes with C-speed operations; only lines that could break a
    bound are looked at again with their strings and comments blanked (a dot or a
    digit inside a string is not part of a key or a number). Brackets are counted
    everywhere: 16 unbalanced brackets inside one string is not a fleet file.
    """
    raw = text.encode("utf-8", "surrogatepass")
    if _nesting_exceeds(raw, MAX_TOML_DEPTH):
        raise InputError(f"{source}: arrays or tables nested deeper than {MAX_TOML_DEPTH} levels")
    # MAX_KEY_PARTS dots in a row once everything but dots and newlines is gone: some
    # line has that many dots (C speed; a 10,000-VM fleet has none such)
    if b"." * MAX_KEY_PARTS in raw.translate(None, _NOT_DOTS):
        for line in _lines_of(raw, _MANY_DOTS.finditer(raw)):
            if _TOML_DOTTED.search(_TOML_SKIP.sub('""', line)):
                raise InputError(f"{source}: a dotted key has more than {MAX_KEY_PARTS} parts")
    if _LONG_RUN in raw.translate(_DIGITS_TO_1, b"_"):
        for line in _lines_of(raw, _TOML_DIGITS.finditer(raw)):
            if _TOML_DIGITS.search(_TOML_SKIP.sub('""', line).encode()):
                raise InputError(f"{source}: a number has more than {MAX_DIGITS} digits")


def _toml(text: str, source: str) -> dict[str, Any]:
    _precheck(text, source)
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
                read_vm_files: Callable[[str], list[tuple[str, str]]] | None = None, *,
                keep_vm: Callable[[str, str], bool] | Only | None = None) -> FleetSpec:
    """Parse fleet TOML text; ``base_dir`` anchors relative paths.

    ``read_vm_files(entry) -> [(text, source)]`` reads one ``vm_files`` entry (a file,
    or a directory of them); without it, ``vm_files`` is an error. ``keep_vm(uuid,
    name)``: only the VMs it admits are in the spec (a one-pair answer); every row is
    checked all the same, so a file is accepted or refused exactly as without it.
    """
    return _select(_parse_full(text, source, base_dir, read_vm_files)[0], keep_vm)


def _parse_full(text: str, source: str, base_dir: str | os.PathLike[str],
                read_vm_files: Callable[[str], list[tuple[str, str]]] | None) -> tuple[_Parsed, bool]:
    """The whole fleet checked, and whether the result depends on nothing but the bytes
    read, the directories and the home directory (no path resolved through ``..``)."""
    # A big fleet file is ~100,000 new objects that all stay alive: the cyclic garbage
    # collector's passes over them find nothing and were a quarter of the parse time.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse_fleet(text, source, base_dir, read_vm_files)
    finally:
        if enabled:
            gc.enable()


class Only(NamedTuple):
    """A ``keep_vm`` for one-pair answers: the rows whose UUID is one of ``uuids`` or whose
    name is ``name`` (found with C-speed list searches, not a call per row)."""

    uuids: frozenset[str]
    name: str

    def __call__(self, uuid: str, name: str) -> bool:
        return uuid in self.uuids or name == self.name


def _indices(column: list[str], value: str) -> Iterator[int]:
    i = -1
    while True:
        try:
            i = column.index(value, i + 1)
        except ValueError:
            return
        yield i


def _select(parsed: _Parsed, keep_vm: Callable[[str, str], bool] | Only | None) -> FleetSpec:
    """The spec with the VMs ``keep_vm(uuid, name)`` admits (all without it)."""
    spec, (uuids, names, hosts, files, mems, cpus) = parsed
    rows: Iterable[int]
    if keep_vm is None:
        rows = range(len(uuids))
    elif isinstance(keep_vm, Only):
        by_uuid = (i for u in keep_vm.uuids for i in _indices(uuids, u))
        rows = sorted({*by_uuid, *_indices(names, keep_vm.name)})
    else:
        rows = [i for i, (u, n) in enumerate(zip(uuids, names, strict=True)) if keep_vm(u, n)]
    return replace(spec, vms=tuple(VMSpec(uuids[i], names[i], hosts[i], files[i], mems[i], cpus[i])
                                   for i in rows))


def _parse_fleet(text: str, source: str, base_dir: str | os.PathLike[str],
                 read_vm_files: Callable[[str], list[tuple[str, str]]] | None) -> tuple[_Parsed, bool]:
    reader = _Reader(source, Path(base_dir).resolve())
    raw = _toml(text, source)
    top = reader.table(raw, TOP, "")
    names = top.get("policy_names", {})
    for key, value in names.items():
        if not isinstance(value, str):
            raise reader.fail(f"policy_names.{key}",
                              f"expected a dotted OID string, got {_value_word(value)}")
        if not _OID.match(value):
            raise reader.fail(f"policy_names.{key}", f"{value!r} is not a dotted OID (ASCII digits, "
                              "e.g. 1.3.6.1.4.1.55555.1.1)")
    hosts = [HostSpec(**row) for row in reader.rows(raw, "hosts", HOST)]
    admins = [AdminSpec(**row) for row in reader.rows(raw, "admins", ADMIN)]
    cols = reader.vm_rows(raw.get("vms", []))
    uuids = cols[0]
    if len(uuids) > FLEET_MAX_VMS:
        raise reader.fail("vms", f"more than {FLEET_MAX_VMS:,} VMs (the limit); "
                          "split the fleet into several fleet files")
    cacheable = True
    for entry in top.get("vm_files", ()):
        if read_vm_files is None:
            raise reader.fail("vm_files", "only a fleet file on disk can name vm_files")
        for vm_text, vm_source in read_vm_files(entry):
            extra = _toml(vm_text, vm_source)
            vm_reader = _Reader(vm_source, Path(vm_source).parent.resolve())
            vm_reader.table(extra, {"vms": _Key(list, True)}, "")
            more = vm_reader.vm_rows(extra["vms"])
            for col, add in zip(cols, more, strict=True):
                col += add  # type: ignore[operator]
            cacheable = cacheable and not vm_reader.realpath
            if len(uuids) > FLEET_MAX_VMS:
                raise InputError(f"{vm_source}: more than {FLEET_MAX_VMS:,} VMs in the fleet "
                                 "(the limit); split the fleet into several fleet files")
    vm_hosts = cols[2]
    _unique(reader, "hosts", [h.name for h in hosts], "name")
    _unique(reader, "admins", [a.id for a in admins], "id")
    _unique(reader, "vms", uuids, "uuid")
    host_names = {h.name for h in hosts}
    if not host_names.issuperset(vm_hosts):
        for i, host in enumerate(vm_hosts):
            if host and host not in host_names:
                raise reader.fail(f"vms[{i}].host", f"{host!r} is not one of the [[hosts]]")
    spec = FleetSpec(
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
        vms=(),
        readonly=top.get("readonly", False),
        stall_timeout_s=float(top.get("stall_timeout_s", 30.0)),
        missing_crl=top.get("missing_crl", "refuse"),
    )
    return (spec, cols), cacheable and not reader.realpath


def _unique(reader: _Reader, table: str, values: list[str], key: str) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise reader.fail(f"{table}[{i}].{key}", f"{value!r} appears twice")
        seen.add(value)


class _Total:
    """Bytes read so far for one fleet, against ``FLEET_MAX_TOTAL_BYTES``."""

    def __init__(self) -> None:
        self.used = 0


def _read_text(p: Path, what: str, total: _Total | None = None) -> str:
    try:
        data = read_limited(p, what=what, limit=FLEET_MAX_BYTES)
    except InputError as exc:
        if "larger than" not in str(exc):
            raise
        raise InputError(
            f"{p}: larger than {FLEET_MAX_BYTES // (1024 * 1024)} MiB (the limit for a {what}); "
            "move [[vms]] into several files named by vm_files = [\"vms/\"] (see docs/FLEET.md)"
        ) from exc
    if total is not None:
        total.used += len(data)
        if total.used > FLEET_MAX_TOTAL_BYTES:
            raise InputError(
                f"{p}: the fleet's files together are larger than {FLEET_MAX_TOTAL_BYTES // (1024 * 1024)} "
                "MiB (the limit for one fleet); split it into several fleets (see docs/FLEET.md)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{p}: not UTF-8 text, so not a {what}") from exc


def _read_vm_files(entry: str, total: _Total | None = None) -> list[tuple[str, str]]:
    """One ``vm_files`` entry: a TOML file, or a directory standing for its *.toml files."""
    d = Path(entry)
    if not d.is_dir():
        return [(_read_text(d, "VM list file", total), entry)]
    try:
        files = sorted(f for f in d.iterdir()
                       if f.suffix == ".toml" and not f.name.startswith(".") and f.is_file())
    except OSError as exc:
        raise InputError(f"{d}: cannot list ({exc.strerror or exc})") from exc
    if not files:
        raise InputError(f"{d}: no *.toml files in this vm_files directory")
    return [(_read_text(f, "VM list file", total), str(f)) for f in files]


def load_fleet(path: str | os.PathLike[str], *,
               keep_vm: Callable[[str, str], bool] | Only | None = None) -> FleetSpec:
    """Read and parse a fleet file and its ``vm_files`` (bounded reads, each file and all
    together; one-line InputError on any problem). ``keep_vm``: see ``parse_fleet``.

    The parse result is kept in escort's cache (adapters/parsecache.py) under the files'
    bytes, their directories and escort's code: the next load of the same bytes reads
    every file again (and each bound again) but not the TOML."""
    p = Path(path)
    total = _Total()
    text = _read_text(p, "fleet file", total)
    return _select(_load_parsed(p, text, total), keep_vm)


#: one ``vm_files`` entry as read: each file's (SHA-256 of its text, source, resolved directory)
_Read = tuple[str, tuple[tuple[str, str, str], ...]]


def _load_parsed(p: Path, text: str, total: _Total) -> _Parsed:
    from console.adapters import parsecache

    store = parsecache.open_cache("fleet", p)
    if store is None:
        return _parse_full(text, str(p), p.parent, lambda entry: _read_vm_files(entry, total))[0]
    key = store.key(str(p), str(p.parent.resolve()), os.path.expanduser("~"), parsecache.file_digest(text))
    used = total.used
    hit = _usable(store.load(key))
    if hit is not None:
        parsed, reads = hit
        try:
            if all(_digests(_read_vm_files(entry, total)) == read for entry, read in reads):
                return parsed
        except InputError:
            pass  # parsed again below: the parser says what is wrong, in its order
        store.why_not = "vm_files changed"
        total.used = used
    seen: list[_Read] = []

    def read(entry: str) -> list[tuple[str, str]]:
        got = _read_vm_files(entry, total)
        seen.append((entry, _digests(got)))
        return got

    parsed, cacheable = _parse_full(text, str(p), p.parent, read)
    if cacheable:
        store.store(key, (parsed, tuple(seen)))
    return parsed


def _digests(got: list[tuple[str, str]]) -> tuple[tuple[str, str, str], ...]:
    from console.adapters.parsecache import file_digest

    return tuple((file_digest(t), s, str(Path(s).parent.resolve())) for t, s in got)


def _usable(state: object) -> tuple[_Parsed, tuple[_Read, ...]] | None:
    """A stored parse result of the right shape (else None: parsed anew). The store is
    checked (owner, digest, classes) before; this checks the shape, at C speed."""
    spec: Any
    cols: Any
    reads: Any
    try:
        (spec, cols), reads = state  # type: ignore[misc]
        if type(spec) is not FleetSpec or spec.vms or type(cols) is not tuple or len(cols) != 6 \
                or any(type(c) is not list for c in cols) or len(set(map(len, cols))) != 1:
            return None
        texts, counts = cols[0] + cols[1] + cols[2] + cols[3], cols[4] + cols[5]
        if (texts and set(map(type, texts)) != {str}) or (counts and set(map(type, counts)) != {int}):
            return None
        if not all(type(h) is HostSpec for h in spec.hosts) \
                or not all(type(a) is AdminSpec for a in spec.admins):
            return None
        if type(reads) is not tuple or not all(type(r) is tuple and len(r) == 2 and type(r[0]) is str
                                               and type(r[1]) is tuple for r in reads):
            return None
    except (TypeError, ValueError):
        return None
    return (spec, cols), reads


__all__ = ["FLEET_MAX_BYTES", "FLEET_MAX_TOTAL_BYTES", "FLEET_MAX_VMS", "Only", "load_fleet", "parse_fleet"]
