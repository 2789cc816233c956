"""TESTS ONLY: watch a migration on the wire with tcpdump, to prove what really crossed it.

``capture(lab, host)`` runs ``tcpdump`` (not ours) in the destination's network
namespace on its migration interface, for the TCP ports QEMU listens on for incoming
migrations; ``connections(pcap)`` reads the capture (classic pcap, Ethernet, IPv4) and
returns, per TCP connection to those ports, the first bytes each side sent and how many
payload bytes the source sent. A TLS connection begins with a handshake record (0x16 0x03
…); QEMU's plaintext migration stream begins with its magic ``QEVM`` and a plaintext
multifd channel with 0x11223344 — so a migration that was not encrypted cannot pass.
"""

from __future__ import annotations

import contextlib
import select
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from console.lab import Lab

PORTS = (49152, 49215)  # qemu.conf migration_port_min/max in the lab
TLS_RECORD = b"\x16\x03"  # handshake record, TLS 1.x
QEMU_PLAIN_MAGIC = b"QEVM"
MULTIFD_PLAIN_MAGIC = b"\x11\x22\x33\x44"


@dataclass
class Connection:
    client: tuple[str, int]
    server: tuple[str, int]
    client_first: bytes = b""  # first payload bytes the source sent
    server_first: bytes = b""  # first payload bytes the destination sent
    client_bytes: int = 0  # payload bytes the source sent in all


def tcpdump() -> str:
    path = shutil.which("tcpdump") or ("/usr/bin/tcpdump" if Path("/usr/bin/tcpdump").exists() else "")
    if not path:
        raise RuntimeError("tcpdump is not installed (deps/apt-lab.txt lists it)")
    return path


@contextlib.contextmanager
def capture(lab: Lab, host: str, name: str) -> Iterator[Path]:
    """tcpdump in ``host``'s namespace while the body runs; yields the pcap file."""
    pcap = lab.dir / f"wire-{name}.pcap"
    pcap.unlink(missing_ok=True)
    ns = lab.host(host).ns
    # --immediate-mode: without it tcpdump reads the kernel's ring in blocks (up to 1 s) and a
    # capture stopped within that loses what is still queued ("1003 packets received by
    # filter", "0 packets captured": a fast plaintext move's whole stream)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, tcpdump(), "-i", "back0", "--immediate-mode", "-U", "-n", "-s", "192",
         "-w", str(pcap), f"tcp portrange {PORTS[0]}-{PORTS[1]}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    started = b""
    while b"listening on" not in started:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tcpdump did not start: {started.decode(errors='replace')}")
        ready, _, _ = select.select([proc.stderr], [], [], 0.5)
        if ready:
            started += proc.stderr.read1(4096)  # type: ignore[attr-defined]
    try:
        yield pcap
    finally:
        time.sleep(0.5)  # the last segments
        proc.terminate()
        try:
            _, rest = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, rest = proc.communicate()
        # tcpdump's own summary ("N packets captured ... N dropped by kernel"), for a failure's message
        pcap.with_suffix(".log").write_bytes(started + (rest or b"") + f"\nexit {proc.returncode}\n".encode())


def describe(pcap: Path) -> str:
    """What a capture holds and what tcpdump said about it (for assertion messages)."""
    size = pcap.stat().st_size if pcap.exists() else -1
    log = pcap.with_suffix(".log")
    said = log.read_text(errors="replace").strip() if log.exists() else "(no tcpdump log)"
    return f"{pcap} ({size} bytes); tcpdump: {said}"


def connections(pcap: Path) -> list[Connection]:
    """Every TCP connection to the migration ports, in the order they first sent data."""
    data = pcap.read_bytes()
    if len(data) < 24:
        return []
    magic = data[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    if linktype != 1:
        raise ValueError(f"{pcap}: link type {linktype}, expected Ethernet")
    out: dict[tuple[tuple[str, int], tuple[str, int]], Connection] = {}
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "IIII", data[pos:pos + 16])[2]
        frame = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack("!H", frame[16:18])[0]
        if frame[23] != 6:
            continue
        src = ".".join(str(b) for b in frame[26:30])
        dst = ".".join(str(b) for b in frame[30:34])
        tcp = 14 + ihl
        if len(frame) < tcp + 20:
            continue
        sport, dport = struct.unpack("!HH", frame[tcp:tcp + 4])
        doff = (frame[tcp + 12] >> 4) * 4
        size = total - ihl - doff
        if size <= 0:
            continue
        payload = frame[tcp + doff:tcp + doff + size]
        if PORTS[0] <= dport <= PORTS[1]:
            key = ((src, sport), (dst, dport))
            conn = out.setdefault(key, Connection(*key))
            conn.client_bytes += size
            if len(conn.client_first) < 8:
                conn.client_first += payload[:8 - len(conn.client_first)]
        elif PORTS[0] <= sport <= PORTS[1]:
            key = ((dst, dport), (src, sport))
            conn = out.setdefault(key, Connection(*key))
            if len(conn.server_first) < 8:
                conn.server_first += payload[:8 - len(conn.server_first)]
    return list(out.values())
