"""The long fuzz run: every parser escort exposes to untrusted input, 100,000+ inputs.

    python fuzz/fuzz_parsers.py [--runs 120000] [--seed 1] [--record]

A seeded mutation fuzzer (no coverage feedback; repeatable): each parser gets a few
good inputs (a fleet file, certificates, CRLs, signed tokens, audit lines, domain
XML) and the mutations a fuzzer makes (byte flips, truncations, insertions,
duplicated chunks, tokens from a per-format dictionary, deep nesting). A parser
passes when every input either parses or raises the one error it documents
(``InputError``, ``StrictJSONError``, a ``Problem``, a reason); anything else is a
crash, and its input is written to ``fuzz/crashes/``. The slowest input per parser
is reported, and a last phase times worst-case inputs *at the size limits* (the
"no input of allowed size takes more than a second" goal).

``--record`` appends the report, with the machine line, to ``fuzz/RESULTS.md``.
The CI runs the short, hypothesis-driven version: ``tests/unit/test_no_crash.py``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import hashlib
import json
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe  # noqa: E402
from console.adapters import files, fleetfile  # noqa: E402
from console.cli.pki_cmds import parse_time  # noqa: E402
from console.core import audit, envelope, issuance, strictjson  # noqa: E402
from console.core import policy as pol  # noqa: E402
from console.core.errors import InputError  # noqa: E402
from console.core.pki import TrustStore, load_certificates  # noqa: E402

CRASHES = Path(__file__).with_name("crashes")
RESULTS = Path(__file__).with_name("RESULTS.md")


# ------------------------------------------------------------------ seeds


def _seeds() -> dict[str, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from tests.unit.trustkit import T0, build_fleet, make_kit

    kit = make_kit()
    tmp = Path(tempfile.mkdtemp(prefix="escort-fuzz-"))
    fleet = build_fleet(tmp, kit)
    host = issuance.issue_host(
        issuance.HostSpec(
            "h1",
            country="DE",
            locality="Berlin",
            dns_names=("h1.example",),
            ips=("10.0.0.1",),
            policies=("assurance:high",),
        ),
        issuance.make_key("ec"),
        kit.eu,
        issuance.Validity.days(30, start=T0 - dt.timedelta(days=1)),
    )
    crl = issuance.issue_crl(kit.eu, [(1234, T0), (99, T0)], issuance.Validity.days(30, start=T0), number=3)
    der = serialization.Encoding.DER
    entry1 = audit.make_entry(
        {"kind": "note", "text": "hi"}, seq=1, ts="2026-01-01T00:00:00Z", prev=audit.GENESIS
    )
    entry2 = audit.make_entry(
        {"kind": "decision", "vm": "web-1", "allowed": True},
        seq=2,
        ts="2026-01-01T00:00:01Z",
        prev=audit.line_hash(entry1[1]),
    )
    policy = (tmp / "policies" / "web-1.jws").read_text().strip()
    store, _ = TrustStore.build(
        [("root", issuance.cert_pem(kit.root.cert)), ("eu", issuance.cert_pem(kit.eu.cert))], [], at=T0
    )
    return {
        "tmp": tmp,
        "at": T0,
        "store": store,
        "kit": kit,
        "fleet": fleet.fleet.read_text(),
        "cert_der": host.public_bytes(der),
        "cert_pem": issuance.cert_pem(host),
        "ca_der": kit.eu.cert.public_bytes(der),
        "crl_der": crl.public_bytes(der),
        "crl_pem": issuance.crl_pem(crl),
        "policy": policy,
        "grant": (tmp / "grants" / "anne-web.jws").read_text().strip(),
        "audit": [entry1[1], entry2[1]],
        "xml": f"<domain><name>w</name><metadata>{pol.policy_metadata_xml(policy)}</metadata></domain>",
        "x509": x509,
    }


# ------------------------------------------------------------------ mutations

DICT = {
    "toml": [
        b"[[hosts]]",
        b"[[vms]]",
        b"[policy_names]",
        b"=",
        b".",
        b'"',
        b"'''",
        b'"""',
        b"[",
        b"]",
        b"{",
        b"}",
        b",",
        b"#",
        b"nan",
        b"inf",
        b"-0",
        b"9" * 60,
        b"1e999",
        b"\\u0000",
        b"\\",
        b"\n",
        b"x.y.z",
        b"1979-05-27T07:32:00Z",
        b"\xd9\xa3",
        b"true",
        b"0x1F",
        b"stall_timeout_s = ",
        b'host = ""',
    ],
    "json": [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"',
        b":",
        b",",
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b'"\\ud800"',
        b"1e999",
        b"9" * 60,
        b'"ver"',
        b'"ver":1,"ver":2',
        b"null",
        b"true",
        b"\\",
        b"[" * 200,
    ],
    "xml": [
        b"<domain>",
        b"</domain>",
        b"<metadata>",
        b"</metadata>",
        b"<!DOCTYPE x>",
        b"<!ENTITY",
        b"&amp;",
        b"&x;",
        b"<![CDATA[",
        b"]]>",
        b"<x/>",
        b"<?xml version='1.0'?>",
        b"\x00",
        b"<escort:policy xmlns:escort='" + pol.POLICY_NS.encode() + b"'>",
        b"</escort:policy>",
    ],
    "der": [
        b"\x30\x82\xff\xff",
        b"\x30\x80",
        b"\x02\x01\x07",
        b"\xa0\x03\x02\x01\x05",
        b"\x06\x03\x55\x1d\x0e",
        b"\x05\x00",
        b"\x1e\x01x",
        b"\x17\x0d",
        b"\xff" * 8,
        b"\x00" * 8,
    ],
    "text": [b"T", b"Z", b"+", b"-", b":", b"0001", b"9999", b"12", b"99", b"\x00", b".", b" "],
}


def mutate(rng: random.Random, data: bytes, kind: str) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        op = rng.randrange(7)
        n = len(b)
        if op == 0 and n:  # flip
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 1 and n:  # truncate
            del b[rng.randrange(n) :]
        elif op == 2:  # insert random bytes
            i = rng.randrange(n + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
        elif op == 3 and n:  # duplicate a chunk
            i = rng.randrange(n)
            j = min(n, i + rng.randrange(1, 64))
            b[j:j] = b[i:j] * rng.randrange(1, 4)
        elif op == 4:  # dictionary token
            i = rng.randrange(n + 1)
            b[i:i] = rng.choice(DICT[kind])
        elif op == 5 and n:  # delete a chunk
            i = rng.randrange(n)
            del b[i : i + rng.randrange(1, 32)]
        else:  # repeat a token many times (nesting, long keys)
            i = rng.randrange(n + 1)
            b[i:i] = rng.choice(DICT[kind]) * rng.randrange(2, 400)
    return bytes(b)


# ------------------------------------------------------------------ targets

Target = Callable[[bytes], None]


def targets(s: dict[str, object]) -> dict[str, tuple[list[bytes], str, Target]]:
    at = s["at"]
    store = s["store"]
    tmp = s["tmp"]

    def fleet(data: bytes) -> None:
        with contextlib.suppress(InputError):
            fleetfile.parse_fleet(data.decode("utf-8", "replace"), "f.toml", tmp)  # type: ignore[arg-type]

    def sjson(data: bytes) -> None:
        try:
            value = strictjson.loads(data)
        except strictjson.StrictJSONError:
            return
        json.dumps(value, allow_nan=False).encode()

    def jws(data: bytes) -> None:
        token = data.decode("ascii", "replace")
        for typ, fields in ((envelope.TYP_POLICY, pol.POLICY_FIELDS),):
            book = pol.PolicyBook(store)  # type: ignore[arg-type]
            book.verify(token, at, vm_uuid="6f1c1e1a-8d7b-4c36-9d61-2a3f6a0b9e11")  # type: ignore[arg-type]
            envelope.open_token(token, typ, fields)
        with contextlib.suppress(InputError):
            envelope.decode_unverified(token)

    def jws_parts(data: bytes) -> None:
        # mutate the *decoded* header/payload and re-encode, so the JSON parser sees the damage
        parts = str(s["policy"]).split(".")
        which = data[0] % 2 if data else 0
        seg = base64.urlsafe_b64encode(data[1:]).decode().rstrip("=")
        parts[which] = seg
        jws(".".join(parts).encode())

    def xml(data: bytes) -> None:
        with contextlib.suppress(InputError):
            pol.token_from_metadata_xml(data.decode("utf-8", "surrogateescape"))

    def audit_lines(data: bytes) -> None:
        report = audit.verify_chain(data.splitlines(keepends=True))
        json.dumps(report.as_json())

    def cert(data: bytes) -> None:
        try:  # load_trust_dir turns this InputError into the file's problem
            certs, crls, _problems = files._classify(data, "f")
        except InputError:
            return
        for _src, blob in certs:
            for c in load_certificates(blob, "f"):
                store.verify_host(c, at)  # type: ignore[attr-defined]
                store.verify_owner(c, [], at)  # type: ignore[attr-defined]
        if certs or crls:
            TrustStore.build(
                [("root", issuance.cert_pem(s["kit"].root.cert)), *certs],
                crls,  # type: ignore[attr-defined]
                at=at,
            )  # type: ignore[arg-type]

    def at_text(data: bytes) -> None:
        try:
            value = parse_time(data.decode("utf-8", "replace"))
        except InputError:
            return
        _ = value + dt.timedelta(days=366), value - dt.timedelta(days=366)

    a = "\n".join(s["audit"]).encode() + b"\n"  # type: ignore[arg-type]
    return {
        "fleet TOML": ([str(s["fleet"]).encode()], "toml", fleet),
        "strict JSON": (
            [
                json.dumps({"ver": 1, "a": [1, {"b": "c"}], "n": None}).encode(),
                base64.urlsafe_b64decode(str(s["policy"]).split(".")[1] + "=="),
            ],
            "json",
            sjson,
        ),
        "JWS token": ([str(s["policy"]).encode(), str(s["grant"]).encode()], "json", jws),
        "JWS header/payload JSON": (
            [
                b"\x00" + base64.urlsafe_b64decode(str(s["policy"]).split(".")[0] + "=="),
                b"\x01" + base64.urlsafe_b64decode(str(s["policy"]).split(".")[1] + "=="),
            ],
            "json",
            jws_parts,
        ),
        "domain XML metadata": ([str(s["xml"]).encode()], "xml", xml),
        "audit log": ([a], "json", audit_lines),
        "certificate/CRL (DER, PEM)": (
            [
                s["cert_der"],
                s["cert_pem"],
                s["ca_der"],
                s["crl_der"],  # type: ignore[list-item]
                s["crl_pem"],
            ],
            "der",
            cert,
        ),
        "--at": ([b"2026-11-26T12:00:00Z", b"2026-11-26", b"9997-12-31T23:59:59+14:00"], "text", at_text),
    }


# ------------------------------------------------------------------ worst cases at the size limits


def worst_cases() -> list[tuple[str, Callable[[], object]]]:
    big = fleetfile.FLEET_MAX_BYTES - 1024
    mib = f"{fleetfile.FLEET_MAX_BYTES / (1024 * 1024):g} MiB"
    head = 'name = "f"\nkind = "lab"\ntrust_dir = "t"\nowners_trust_dir = "o"\n'

    def fill(unit: str, before: str = "", after: str = "") -> str:
        """``before`` + as many ``unit`` as fit in the bound + ``after``: well-formed to the
        end where the unit is, so the parser reads all of it."""
        return head + before + unit * ((big - len(before) - len(after)) // len(unit)) + after

    def numbered(line: str) -> str:
        rows, i, size = [], 0, 0
        while size < big:
            rows.append(line.format(i=i))
            size += len(rows[-1])
            i += 1
        return head + "".join(rows[:-1])

    def fleet(text: str) -> Callable[[], object]:
        def go() -> object:
            try:
                return fleetfile.parse_fleet(text, "f.toml", "/nonexistent")
            except InputError as exc:
                return str(exc)

        return go

    def sj(data: bytes) -> Callable[[], object]:
        def go() -> object:
            try:
                return strictjson.loads(data)
            except strictjson.StrictJSONError as exc:
                return str(exc)

        return go

    limit = envelope.MAX_TOKEN_BYTES
    nested_header = base64.urlsafe_b64encode(b'{"alg":' + b"[" * (limit // 3) + b"]" * (limit // 3) + b"}")
    return [
        (f"fleet {mib}: one dotted key of 1 M parts", fleet(head + "a" + ".a" * (big // 2 - 40) + " = 1\n")),
        (f"fleet {mib}: 16-part dotted keys, one per line",
         fleet(fill("a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p = 1\n"))),
        (f"fleet {mib}: nested arrays", fleet(head + "x = " + "[" * (big // 2 - 40) + "]" * (big // 2 - 40))),
        (f"fleet {mib}: one long string", fleet(head + 'x = "' + "a" * (big - 100) + '"\n')),
        (f"fleet {mib}: unterminated strings", fleet(fill('"\n'))),
        (f"fleet {mib}: digits", fleet(head + "x = " + "1" * (big - 100))),
        (f"fleet {mib}: a table header on every line", fleet(numbered("[t{i}]\n"))),
        (f"fleet {mib}: [[vms]] headers only", fleet(fill("[[vms]]\n"))),
        (f"fleet {mib}: inline tables", fleet(fill("{a=1},", "x = [", "]\n"))),
        (f"fleet {mib}: one key per line", fleet(numbered("k{i}=1\n"))),
        (f"fleet {mib}: dotted keys making tables", fleet(numbered("a{i}.b.c = 1\n"))),
        (f"fleet {mib}: small integers", fleet(fill("1,", "x = [", "1]\n"))),
        (f"fleet {mib}: empty strings", fleet(fill('"",', "x = [", '""]\n'))),
        (f"fleet {mib}: empty arrays", fleet(fill("[],", "x = [", "[]]\n"))),
        (f"fleet {mib}: comments", fleet(fill("#\n"))),
        (f"fleet {mib}: valid [[vms]] rows (all checked)", fleet(
            head.replace('kind = "lab"', 'kind = "demo"') + '[[hosts]]\nname = "h"\n' + numbered(
                '[[vms]]\nuuid = "00000000-0000-4000-8000-{i:012d}"\nname = "vm-{i}"\nhost = "h"\n'
                'policy_file = "policies/vm-{i}.jws"\nmemory_mib = 4096\nvcpus = 4\n\n')[len(head):])),
        ("strict JSON 64 KiB: nesting", sj(b"[" * limit)),
        (
            "strict JSON 64 KiB: many keys",
            sj(b"{" + b",".join(b'"k%d":1' % i for i in range(limit // 10)) + b"}"),
        ),
        (
            "JWS 64 KiB: nested header",
            lambda: envelope.open_token(
                nested_header.decode()[:limit] + ".e30.AA", envelope.TYP_POLICY, pol.POLICY_FIELDS
            ),
        ),
        (
            "metadata XML 1 MiB: deep elements",
            lambda: _xml("<a>" * (pol.MAX_METADATA_CHARS // 8) + "</a>" * (pol.MAX_METADATA_CHARS // 8)),
        ),
        ("audit line 1 MiB: nesting", lambda: audit.verify_chain(["[" * (1 << 20) + "\n"])),
    ]


def _xml(text: str) -> object:
    try:
        return pol.token_from_metadata_xml(text)
    except InputError as exc:
        return str(exc)


# ------------------------------------------------------------------ main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=120_000, help="total inputs over all parsers")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--record", action="store_true", help="append the report to fuzz/RESULTS.md")
    ap.add_argument("--worst-only", action="store_true", help="only the worst cases at the size limits")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    seeds = _seeds()
    tgts = targets(seeds)
    per = max(1, args.runs // len(tgts))
    if args.worst_only:
        tgts = {}
    title = "worst cases only" if args.worst_only else f"{per * len(tgts):,} inputs, seed {args.seed}"
    lines = [
        f"## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — {title}",
        "",
        f"Machine: {describe()}",
        "",
        "| parser | inputs | crashes | slowest input (s; re-timed best of 3) | total (s) |",
        "|---|---|---|---|---|",
    ]
    crashes = 0
    started = time.perf_counter()
    for name, (corpus, kind, fn) in tgts.items():
        bad = 0
        slowest = 0.0
        slowest_input = b""
        t0 = time.perf_counter()
        for _ in range(per):
            data = mutate(rng, rng.choice(corpus), kind)
            s = time.perf_counter()
            try:
                fn(data)
            except Exception:  # a crash: keep the input
                bad += 1
                CRASHES.mkdir(exist_ok=True)
                digest = hashlib.sha256(data).hexdigest()[:16]
                slug = "".join(c for c in name.split()[0].lower() if c.isalnum())
                (CRASHES / f"{slug}-{digest}.bin").write_bytes(data)
                (CRASHES / f"{slug}-{digest}.txt").write_text(traceback.format_exc())
            took = time.perf_counter() - s
            if took > slowest:
                slowest, slowest_input = took, data
        crashes += bad
        # the slowest input again, best of three: a one-off stall of a shared machine or the input?
        again = []
        for _ in range(3):
            s = time.perf_counter()
            with contextlib.suppress(Exception):
                fn(slowest_input)
            again.append(time.perf_counter() - s)
        lines.append(f"| {name} | {per:,} | {bad} | {slowest:.3f} (again: {min(again):.3f}) | "
                     f"{time.perf_counter() - t0:.1f} |")
        print(lines[-1], flush=True)
    lines += [
        "",
        "Worst cases at the size limits (each must be refused or parsed within 1 s; wall time of",
        "the first call, then the best of three and its CPU time, which a loaded machine inflates less):",
        "",
        "| input | seconds (first) | best of 3 | CPU of the best | outcome |",
        "|---|---|---|---|---|",
    ]
    for name, fn in worst_cases():
        timings = []
        outcome = ""
        for _ in range(3):
            s, c = time.perf_counter(), time.process_time()
            try:
                out = fn()
                outcome = (str(out)[:70] if isinstance(out, str) else type(out).__name__).replace("|", "/")
            except Exception as exc:
                crashes += 1
                outcome = f"CRASH {type(exc).__name__}"
            timings.append((time.perf_counter() - s, time.process_time() - c))
        best = min(timings)
        lines.append(f"| {name} | {timings[0][0]:.3f} | {best[0]:.3f} | {best[1]:.3f} | {outcome} |")
        print(lines[-1], flush=True)
    lines += ["", f"Total {time.perf_counter() - started:.0f} s, {crashes} crash(es)."]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.record:
        text = (
            RESULTS.read_text()
            if RESULTS.exists()
            else (
                "# Fuzz results\n\n`python fuzz/fuzz_parsers.py --record` (see its docstring). "
                "Newest first.\n"
            )
        )
        head, _, rest = text.partition("\n## ")
        RESULTS.write_text(head.rstrip("\n") + "\n\n" + report + ("\n## " + rest if rest else ""))
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
