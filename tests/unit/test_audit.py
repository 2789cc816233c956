"""The audit chain catches edits, removals, reorders and truncation, and says where."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from console.adapters.audit import AuditError, AuditLog, read_entries, verify_file
from console.cli import main
from console.core.audit import GENESIS, canonical_line, line_hash, make_entry, verify_chain
from console.core.errors import InputError


def _chain(n: int) -> list[str]:
    lines, prev = [], GENESIS
    for i in range(1, n + 1):
        _, line = make_entry({"kind": "note", "n": i, "vm": "web-1"}, seq=i,
                             ts=f"2026-01-01T00:00:{i:02d}.000000Z", prev=prev)
        lines.append(line + "\n")
        prev = line_hash(line)
    return lines


def _codes(lines: list[str]) -> list[tuple[int, str]]:
    return [(p.line, p.code) for p in verify_chain(lines).problems]


def test_intact_chain_verifies_and_reports_head() -> None:
    lines = _chain(5)
    report = verify_chain(lines)
    assert report.ok and report.entries == 5 and report.last_seq == 5
    assert report.head == line_hash(lines[-1].rstrip("\n"))
    assert verify_chain([]).ok and verify_chain([]).head == GENESIS


def test_first_entry_links_to_genesis() -> None:
    entry = json.loads(_chain(1)[0])
    assert entry["prev"] == GENESIS and entry["seq"] == 1


def test_edit_in_the_middle_is_found_at_that_line() -> None:
    lines = _chain(5)
    entry = json.loads(lines[2])
    entry["vm"] = "db-1"
    lines[2] = canonical_line(entry) + "\n"
    codes = _codes(lines)
    assert (3, "audit.edited") in codes
    assert (4, "audit.link") in codes  # the next link is broken as well


def test_edit_with_recomputed_own_hash_still_breaks_the_next_link() -> None:
    lines = _chain(5)
    entry = json.loads(lines[1])
    entry["outcome"] = "success"
    del entry["hash"]
    entry, line = make_entry({k: v for k, v in entry.items() if k not in ("seq", "ts", "prev")},
                             seq=entry["seq"], ts=entry["ts"], prev=entry["prev"])
    lines[1] = line + "\n"
    assert _codes(lines) == [(3, "audit.link")]


def test_edit_of_the_last_line_is_found() -> None:
    lines = _chain(3)
    lines[2] = lines[2].replace('"web-1"', '"web-2"')
    assert _codes(lines) == [(3, "audit.edited")]


def test_reformatting_a_line_is_visible() -> None:
    lines = _chain(3)
    lines[1] = json.dumps(json.loads(lines[1]), indent=None) + "\n"  # spaces after separators
    codes = _codes(lines)
    assert (2, "audit.not_canonical") in codes and (3, "audit.link") in codes


def test_removed_entry_is_named() -> None:
    lines = _chain(5)
    del lines[2]
    report = verify_chain(lines)
    assert [(p.line, p.code) for p in report.problems] == [(3, "audit.link"), (3, "audit.seq")]
    assert "entry 3" in report.problems[1].message


def test_removed_first_entry_is_found() -> None:
    lines = _chain(3)[1:]
    codes = _codes(lines)
    assert (1, "audit.link") in codes and (1, "audit.seq") in codes


def test_reordered_entries_are_found() -> None:
    lines = _chain(5)
    lines[1], lines[2] = lines[2], lines[1]
    codes = _codes(lines)
    assert {(2, "audit.link"), (3, "audit.link"), (4, "audit.link")} <= set(codes)
    assert (3, "audit.seq") in codes
    assert any("reordered" in p.message for p in verify_chain(lines).problems)


def test_line_truncated_in_the_middle_is_unreadable_and_the_rest_still_checked() -> None:
    lines = _chain(5)
    lines[1] = lines[1][:40] + "\n"
    report = verify_chain(lines)
    assert [(p.line, p.code) for p in report.problems] == [(2, "audit.unreadable")]
    # later links are still checked: an edit further down is found as well
    lines[3] = lines[3].replace("web-1", "web-9")
    assert (4, "audit.edited") in _codes(lines)


def test_torn_last_line_and_expected_head() -> None:
    lines = _chain(3)
    good_head = verify_chain(lines).head
    assert verify_chain(lines, expect_head=good_head).ok
    # cut off the end: the chain alone is fine, the recorded head is not
    assert [p.code for p in verify_chain(lines[:2], expect_head=good_head).problems] == ["audit.head"]
    torn = [*lines[:2], lines[2][:-10]]
    assert (3, "audit.torn") in _codes(torn)


def test_make_entry_refuses_reserved_fields() -> None:
    with pytest.raises(ValueError, match="reserved"):
        make_entry({"kind": "note", "prev": "x"}, seq=1, ts="t", prev=GENESIS)
    with pytest.raises(ValueError, match="kind"):
        make_entry({"vm": "x"}, seq=1, ts="t", prev=GENESIS)


# -- the file adapter ---------------------------------------------------------------

def _fixed_clock() -> dt.datetime:
    return dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)


def test_append_chains_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    with AuditLog(path, clock=_fixed_clock) as log:
        first = log.append({"kind": "decision", "vm": "a"})
        log.append({"kind": "outcome", "vm": "a"})
        head = log.head
    assert first["ts"] == "2026-01-02T03:04:05.678901Z" and first["prev"] == GENESIS
    with AuditLog(path) as log:
        assert log.seq == 2 and log.head == head
        third = log.append({"kind": "note"})
    assert third["seq"] == 3 and third["prev"] == head
    report = verify_file(path, signatures=False)  # the chain alone (signatures: test_audit_signatures.py)
    assert report.ok and report.entries == 3
    assert [e["kind"] for e in read_entries(path)] == ["decision", "outcome", "note"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_two_logs_on_one_file_do_not_break_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    a, b = AuditLog(path), AuditLog(path)
    try:
        for i in range(5):
            a.append({"kind": "note", "who": "a", "i": i})
            b.append({"kind": "note", "who": "b", "i": i})
    finally:
        a.close()
        b.close()
    report = verify_file(path, signatures=False)  # the chain alone (signatures: test_audit_signatures.py)
    assert report.ok, report.problems
    assert report.entries == 10


def _hammer(path: str, who: str) -> None:
    with AuditLog(path) as log:
        for i in range(40):
            log.append({"kind": "note", "who": who, "i": i, "pad": "x" * 300})


def test_concurrent_processes_never_interleave(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.jsonl")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(path, w)) for w in ("p1", "p2", "p3")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    report = verify_file(path, signatures=False)  # the chain alone (signatures: test_audit_signatures.py)
    assert report.ok, report.problems[:3]
    assert report.entries == 120


def test_append_is_fsynced_before_returning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: (calls.append("write"), real_write(fd, data))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    with AuditLog(tmp_path / "a.jsonl") as log:
        calls.clear()
        log.append({"kind": "note"})
        assert calls[-1] == "fsync" and "write" in calls


def test_torn_log_is_not_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append({"kind": "note"})
    with path.open("ab") as fh:
        fh.write(b'{"kind":"decision","se')
    with pytest.raises(AuditError, match="incomplete"):
        AuditLog(path)


def test_audit_verify_cli_exit_codes(tmp_path: Path) -> None:
    from tests.unit.test_audit_signatures import signed_log

    path, _fp = signed_log(tmp_path, 4)
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", str(path)])
    assert ok.exit_code == 0, ok.output
    assert "8 entries" in ok.output  # 4 entries, each followed by its signature
    js = runner.invoke(main, ["audit", "verify", "--json", str(path)])
    assert js.exit_code == 0 and json.loads(js.output)["ok"] is True

    lines = path.read_text().splitlines(keepends=True)
    del lines[1]
    path.write_text("".join(lines))
    bad = runner.invoke(main, ["audit", "verify", str(path)])
    assert bad.exit_code == 1
    assert "line 2" in bad.output
    bad_js = runner.invoke(main, ["audit", "verify", "--json", str(path)])
    assert bad_js.exit_code == 1
    assert {p["line"] for p in json.loads(bad_js.output)["problems"] if p["code"] == "audit.link"} == {2}

    missing = runner.invoke(main, ["audit", "verify", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 2 and "no such audit log" in missing.output
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00\xff\x00 not a log\n")
    unusable = runner.invoke(main, ["audit", "verify", str(garbage)])
    assert unusable.exit_code == 2 and "not an escort audit log" in unusable.output


def test_threads_sharing_one_log(tmp_path: Path) -> None:
    """Parallel migrations in one console append from several threads."""
    import threading

    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        def work(who: int) -> None:
            for i in range(50):
                log.append({"kind": "note", "who": who, "i": i})

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.seq == 200
    report = verify_file(path, signatures=False)  # the chain alone (signatures: test_audit_signatures.py)
    assert report.ok and report.entries == 200 and report.last_seq == 200


def _within(seconds: float, fn: object) -> BaseException | None:
    """Run ``fn`` in a daemon thread; the exception it raised (None: it returned). Fails if it hangs."""
    import threading

    out: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
            out.append(None)
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"still blocked after {seconds} s"
    return out[0]


def test_an_audit_log_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path) -> None:
    """Probe2: a FIFO where the audit log belongs hung `escort migrate` (and `audit verify`)
    in open() for good; a symlink to /dev/null was opened and only the fsync failed
    ("Invalid argument"). Now both are one line saying it is not a regular file."""
    fifo = tmp_path / "audit.log"
    os.mkfifo(fifo)
    exc = _within(3, lambda: AuditLog(fifo))
    assert isinstance(exc, AuditError) and "named pipe" in str(exc)
    exc = _within(8, lambda: verify_file(fifo))
    assert isinstance(exc, InputError) and "named pipe" in str(exc)
    null = tmp_path / "null.log"
    null.symlink_to("/dev/null")
    exc = _within(3, lambda: AuditLog(null))
    assert isinstance(exc, AuditError) and "not a regular file" in str(exc)
    # a symlink to a regular file is still a log
    real = tmp_path / "real.log"
    link = tmp_path / "link.log"
    link.symlink_to(real)
    with AuditLog(link) as log:
        log.append({"kind": "note"})
    assert verify_file(real, signatures=False).entries == 1


def test_the_outside_copy_may_be_a_pipe(tmp_path: Path) -> None:
    """``--copy <(journalctl -t escort -o cat)`` is a pipe: read once, not refused."""
    import threading

    log_path = tmp_path / "audit.log"
    with AuditLog(log_path) as log:
        log.append({"kind": "note"})
    fifo = tmp_path / "copy"
    os.mkfifo(fifo)
    line = log_path.read_bytes()

    def writer() -> None:
        with open(fifo, "wb") as fh:
            fh.write(b"escort: " + line)

    threading.Thread(target=writer, daemon=True).start()
    report = verify_file(log_path, signatures=False, copy=fifo)
    assert report.ok, report.problems


def test_a_log_truncated_to_nothing_fails_against_its_recorded_head(tmp_path: Path) -> None:
    """Probe2: `: > audit.log; escort audit verify audit.log --head H` said "not an escort audit
    log" (exit 2); it is a log whose entries were all cut off: audit.head, exit 1."""
    log_path = tmp_path / "audit.log"
    with AuditLog(log_path) as log:
        log.append({"kind": "note"})
        head = log.head
    log_path.write_bytes(b"")
    report = verify_file(log_path, expect_head=head, signatures=False)
    assert [p.code for p in report.problems] == ["audit.head"]
    r = CliRunner().invoke(main, ["audit", "verify", str(log_path), "--head", head])
    assert r.exit_code == 1 and "audit.head" in r.output, r.output
    assert verify_file(log_path, signatures=False).ok  # without an anchor: nothing to see (documented)


def test_a_write_cut_short_by_a_full_disk_is_taken_back(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Probe2 (lab, a full tmpfs): the append failed ("disk full", nothing moved) but left half a
    line behind, so every later open refused the log until it was repaired by hand."""
    import errno

    log_path = tmp_path / "audit.log"
    with AuditLog(log_path) as log:
        log.append({"kind": "note", "n": 1})
        intact = log_path.read_bytes()
        real_write = os.write
        calls = {"n": 0}

        def full(fd: int, data: object) -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                return real_write(fd, bytes(data)[:10])  # type: ignore[call-overload]
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(AuditError, match="disk full"):
            log.append({"kind": "note", "n": 2})
        monkeypatch.setattr(os, "write", real_write)
    assert log_path.read_bytes() == intact
    with AuditLog(log_path) as log:  # usable again once there is room
        log.append({"kind": "note", "n": 2})
    assert verify_file(log_path, signatures=False).ok
