"""Benchmark: refreshing 200 hosts over SSH, escort's pool vs. one OpenSSH `ssh` per host.

Run:  python bench/bench_inventory.py [--hosts 200] [--concurrency 10] [--record]

What is measured, exactly (same run, same servers, same known_hosts, same key):

* The hosts: N asyncssh servers on 127.0.0.1, each with its own ed25519 host key,
  running in a **separate process** (so the servers' CPU cost is not charged to our
  client's event loop; both clients face identical servers). A server answers any
  ``cat PATH`` / ``head -c N -- PATH`` with an in-memory ~600-byte PEM certificate
  and ``hostname`` with its name. No shell, no disk: the servers' work is minimal
  and the same for every client.
* Per host, every client does: TCP connect, SSH key exchange, host-key check against
  a known_hosts file listing all N hosts, public-key authentication (ed25519), one
  exec channel that reads the certificate, and checks the bytes it got.
* ``ssh, sequential``: ``ssh -F /dev/null -o UserKnownHostsFile=KH -o
  StrictHostKeyChecking=yes -o BatchMode=yes -i KEY -p PORT root@127.0.0.1 cat PATH``,
  once per host, one after another (what a shell loop over the fleet does).
* ``ssh, 10 in parallel``: the same commands, 10 at a time (xargs -P10 style), to
  separate "concurrency" from "no process per host".
* ``escort pool``: ``SshPool.read_file`` for every host, at most ``--concurrency`` at a
  time (the inventory refresh's bound), from cold (no connection open yet).
* ``escort refresh``: the full ``InventoryService.refresh()`` (cold): the above plus,
  per host, opening a libvirt ``test:///default`` connection in the host's worker
  thread and reading its facts (libvirt through SSH needs a real libvirtd; this keeps
  the thread hop and the facts code in the measurement). More work than the ssh rows.
* ``escort refresh, warm``: a second refresh on the same service: pooled SSH
  connections and libvirt handles are reused, so only the exec + facts remain.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncssh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.machine import describe, record  # noqa: E402

CERT_PATH = "/etc/pki/qemu/server-cert.pem"


def _make_cert() -> bytes:
    """A real self-signed certificate, so the payload has a realistic size."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-host")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


# --- the server process ------------------------------------------------------------
async def _serve(count: int, workdir: Path) -> None:
    cert = (workdir / "cert.pem").read_bytes()
    authorized = asyncssh.import_authorized_keys((workdir / "id_ed25519.pub").read_text())

    def factory(name: str):  # type: ignore[no-untyped-def]
        async def handle(process: asyncssh.SSHServerProcess[bytes]) -> None:
            argv = (process.command or "").split()
            if argv and argv[0] in ("cat", "head") and argv[-1] == CERT_PATH:
                process.stdout.write(cert)
                process.exit(0)
            elif argv == ["hostname"]:
                process.stdout.write(name.encode() + b"\n")
                process.exit(0)
            else:
                process.stderr.write(b"unsupported command\n")
                process.exit(127)

        return handle

    lines = []
    servers = []
    for i in range(count):
        key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.create_server(
            asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[key],
            authorized_client_keys=authorized, process_factory=factory(f"host{i}"),
            encoding=None,
        )
        port = server.sockets[0].getsockname()[1]
        servers.append(server)
        pub = key.export_public_key("openssh").decode().strip()
        lines.append(f"[127.0.0.1]:{port} {pub}")
    (workdir / "known_hosts").write_text("\n".join(lines) + "\n")
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin


# --- clients -----------------------------------------------------------------------
def _ports(workdir: Path) -> list[int]:
    ports = []
    for line in (workdir / "known_hosts").read_text().splitlines():
        ports.append(int(line.split()[0].split("]:")[1]))
    return ports


def _ssh_cmd(workdir: Path, port: int) -> list[str]:
    return [
        "ssh", "-F", "/dev/null",
        "-o", f"UserKnownHostsFile={workdir / 'known_hosts'}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10",
        "-i", str(workdir / "id_ed25519"), "-p", str(port), "root@127.0.0.1", "cat", CERT_PATH,
    ]


def _ssh_one(workdir: Path, port: int, cert: bytes) -> None:
    out = subprocess.run(_ssh_cmd(workdir, port), capture_output=True, check=False,
                         stdin=subprocess.DEVNULL, env={**os.environ, "SSH_AUTH_SOCK": ""})
    if out.returncode != 0 or out.stdout != cert:
        raise SystemExit(f"ssh to port {port} failed: {out.stderr.decode().strip()}")


def bench_ssh(workdir: Path, ports: list[int], cert: bytes, parallel: int) -> float:
    start = time.perf_counter()
    if parallel <= 1:
        for port in ports:
            _ssh_one(workdir, port, cert)
    else:
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(lambda p: _ssh_one(workdir, p, cert), ports))
    return time.perf_counter() - start


async def bench_pool(workdir: Path, ports: list[int], cert: bytes, concurrency: int) -> float:
    from console.adapters.ssh import SshPool

    os.environ.pop("SSH_AUTH_SOCK", None)
    pool = SshPool(known_hosts=str(workdir / "known_hosts"), config=None,
                   identity_files=[str(workdir / "id_ed25519")])
    sem = asyncio.Semaphore(concurrency)

    async def one(port: int) -> None:
        async with sem:
            data = await pool.read_file(f"root@127.0.0.1:{port}", CERT_PATH)
        if data != cert:
            raise SystemExit(f"pool: wrong certificate from port {port}")

    start = time.perf_counter()
    await asyncio.gather(*(one(p) for p in ports))
    elapsed = time.perf_counter() - start
    assert pool.connects == len(ports)
    await pool.close()
    return elapsed


async def bench_refresh(workdir: Path, ports: list[int], cert: bytes,
                        concurrency: int) -> tuple[float, float]:
    from console.adapters.ssh import SshPool
    from console.core.inventory import FleetSpec, HostSpec
    from console.services.inventory import InventoryService

    os.environ.pop("SSH_AUTH_SOCK", None)
    hosts = tuple(
        HostSpec(name=f"host{i}", ssh=f"root@127.0.0.1:{p}", libvirt_uri="test:///default",
                 remote_cert=CERT_PATH)
        for i, p in enumerate(ports)
    )
    fleet = FleetSpec(name="bench", kind="lab", base_dir=str(workdir), trust_dir="t",
                      owners_trust_dir="o", hosts=hosts)
    pool = SshPool(known_hosts=str(workdir / "known_hosts"), config=None,
                   identity_files=[str(workdir / "id_ed25519")])
    inv = InventoryService(fleet, pool=pool, concurrency=concurrency)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        results = await inv.refresh()
        times.append(time.perf_counter() - start)
        bad = [r for r in results.values() if r.problem or not r.facts or r.facts.cert_pem != cert]
        if bad:
            raise SystemExit(f"refresh: {len(bad)} hosts failed, e.g. {bad[0].problem}")
    await inv.close()
    return times[0], times[1]


def _ssh_version() -> str:
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return out.split(",")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve(args.serve, Path(args.dir)))
        return
    if shutil.which("ssh") is None:
        raise SystemExit("the OpenSSH client (ssh) is needed for the comparison")

    workdir = Path(tempfile.mkdtemp(prefix="escort-bench-"))
    key = asyncssh.generate_private_key("ssh-ed25519")
    key.write_private_key(workdir / "id_ed25519")
    os.chmod(workdir / "id_ed25519", 0o600)
    (workdir / "id_ed25519.pub").write_bytes(key.export_public_key())
    cert = _make_cert()
    (workdir / "cert.pem").write_bytes(cert)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(args.hosts), "--dir", str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise SystemExit("the server process did not start")
        ports = _ports(workdir)
        n = len(ports)
        rows: list[tuple[str, float]] = []
        t_seq = bench_ssh(workdir, ports, cert, 1)
        rows.append(("ssh, sequential (one process per host)", t_seq))
        rows.append(("ssh, 10 in parallel", bench_ssh(workdir, ports, cert, 10)))
        rows.append((f"escort pool, cold, concurrency {args.concurrency}",
                     asyncio.run(bench_pool(workdir, ports, cert, args.concurrency))))
        cold, warm = asyncio.run(bench_refresh(workdir, ports, cert, args.concurrency))
        rows.append((f"escort refresh (+libvirt test:///), cold, concurrency {args.concurrency}", cold))
        rows.append(("escort refresh, warm (connections reused)", warm))
    finally:
        if server.stdin:
            server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"## Inventory refresh over SSH, {n} hosts ({when})",
        "",
        f"Machine: {describe(f'asyncssh {asyncssh.__version__}', _ssh_version())}.",
        "Servers: asyncssh in a separate process on 127.0.0.1 (see bench/bench_inventory.py for "
        "exactly what is measured). Per host: TCP connect, key exchange, known_hosts check "
        f"({n} entries), ed25519 public-key auth, one exec reading the certificate.",
        "",
        "| client | wall time | per host (wall / hosts) | vs. ssh sequential |",
        "|---|---:|---:|---:|",
    ]
    for label, t in rows:
        ratio = "baseline" if t == t_seq else f"{t_seq / t:.1f}x faster"
        out.append(f"| {label} | {t:.2f} s | {1000 * t / n:.1f} ms | {ratio} |")
    out.append("")
    text = "\n".join(out)
    print(text)
    print(json.dumps({label: round(t, 3) for label, t in rows}))
    if args.record:
        record(text)


if __name__ == "__main__":
    main()
