"""SSH client keys the way OpenSSH finds them: the agent first, then key files, never a prompt.

Reusable on purpose: :class:`console.adapters.ssh.SshPool` uses these functions for every
hop of every connection, and proof-of-possession of an admin's key uses the same
:func:`load_identity_file`, :class:`AgentSource` and :func:`collect_keys` to find the key
with a given fingerprint.

What OpenSSH does, and so do we:

* Keys held by ``ssh-agent`` (``SSH_AUTH_SOCK``, or ``IdentityAgent`` in ssh_config) are
  offered first; with ``IdentitiesOnly yes`` only agent keys that match an identity file.
* Identity files (the fleet's ``identity_files``, then the host's ``IdentityFile`` lines,
  or OpenSSH's default files when neither names one) are read without a passphrase. An
  encrypted file is *skipped*, never prompted for: nobody can answer a prompt inside the
  console. If the agent holds the same key, that is how it is used (as OpenSSH does);
  if nothing else works, the authentication error names the file and the fix
  (``ssh-add FILE``).
* A missing identity file is skipped too (OpenSSH warns and goes on); the error names it
  if authentication then fails.
* An agent that does not answer within :data:`AGENT_TIMEOUT_S` is left out, with a note
  for the error line, instead of hanging every connection until the login timeout.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

#: OpenSSH's default identity files, in its order (used when no IdentityFile is given).
DEFAULT_IDENTITY_FILES = (
    "~/.ssh/id_rsa",
    "~/.ssh/id_ecdsa",
    "~/.ssh/id_ecdsa_sk",
    "~/.ssh/id_ed25519",
    "~/.ssh/id_ed25519_sk",
    "~/.ssh/id_dsa",
)
AGENT_TIMEOUT_S = 5.0
#: How long one agent answer (its key list) is reused; ``ssh-add`` shows up after this.
AGENT_CACHE_S = 2.0
#: How long an agent that failed (silent, gone) is not asked again: a refresh of many hosts
#: then waits for it once, not once per host.
AGENT_FAILURE_CACHE_S = 30.0

OK = "ok"
ENCRYPTED = "encrypted"
MISSING = "missing"
UNREADABLE = "unreadable"


def fingerprint_of(public_blob: bytes) -> str:
    """``SHA256:...`` of an SSH public key blob, as ``ssh-keygen -l`` prints it."""
    digest = base64.b64encode(hashlib.sha256(public_blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


@dataclass(frozen=True)
class IdentityFile:
    """One identity file as loading found it (``status`` is ok/encrypted/missing/unreadable)."""

    path: str
    status: str
    keypairs: tuple[asyncssh.SSHKeyPair, ...] = ()
    public_blob: bytes | None = None  # the plain public key, when it could be learnt
    detail: str = ""

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.public_blob) if self.public_blob else ""

    def problem(self) -> str:
        """Why this file gave no usable key, with the fix ("" when it did)."""
        if self.status == ENCRYPTED:
            return f"{self.path} is encrypted and its key is not in the agent (run: ssh-add {self.path})"
        if self.status == MISSING:
            return f"identity file {self.path} does not exist"
        if self.status == UNREADABLE:
            return f"identity file {self.path} is unusable ({self.detail})"
        return ""


def public_blob_of(path: str) -> bytes | None:
    """The public key of a private key file without decrypting it.

    ``FILE.pub`` when present (what OpenSSH reads), else the public key stored in the
    clear in the ``openssh-key-v1`` container (OpenSSH's own format, also when encrypted).
    """
    pub = Path(path + ".pub")
    with contextlib.suppress(OSError, ValueError, IndexError):
        if pub.is_file():
            return base64.b64decode(pub.read_text(errors="replace").split()[1])
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    begin, end = "-----BEGIN OPENSSH PRIVATE KEY-----", "-----END OPENSSH PRIVATE KEY-----"
    if begin not in text or end not in text:
        return None
    try:
        body = base64.b64decode("".join(text.split(begin, 1)[1].split(end, 1)[0].split()))
        magic = b"openssh-key-v1\0"
        if not body.startswith(magic):
            return None
        pos = len(magic)
        for _ in range(3):  # cipher name, kdf name, kdf options
            (length,) = struct.unpack(">I", body[pos:pos + 4])
            pos += 4 + length
        (count,) = struct.unpack(">I", body[pos:pos + 4])
        pos += 4
        if count < 1:
            return None
        (length,) = struct.unpack(">I", body[pos:pos + 4])
        blob = body[pos + 4:pos + 4 + length]
        return blob if len(blob) == length else None
    except (ValueError, struct.error):
        return None


def load_identity_file(path: str) -> IdentityFile:
    """Load one private key file (and ``FILE-cert.pub`` beside it) without any passphrase."""
    full = str(Path(path).expanduser())
    if not Path(full).exists():
        return IdentityFile(path, MISSING)
    try:
        pairs = tuple(asyncssh.load_keypairs([full]))
    except asyncssh.KeyImportError as exc:
        if "passphrase" in str(exc).lower():
            return IdentityFile(path, ENCRYPTED, public_blob=public_blob_of(full))
        return IdentityFile(path, UNREADABLE, public_blob=public_blob_of(full), detail=str(exc))
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return IdentityFile(path, UNREADABLE, detail=detail)
    blob = pairs[0].key_public_data if pairs else None
    return IdentityFile(path, OK, pairs, public_blob=blob)


@dataclass
class AgentKeys:
    """What the agent answered: its keys, or why it could not be used (``problem``)."""

    path: str
    keypairs: list[asyncssh.SSHKeyPair] = field(default_factory=list)
    problem: str = ""


class AgentSource:
    """One ssh-agent, asked with a timeout so a silent agent never hangs a connection.

    ``path``: the agent socket; ``None`` means ``SSH_AUTH_SOCK``. Agent key pairs sign
    through this object's connection, so keep it open while they are in use and
    :meth:`close` it on the same event loop.
    """

    def __init__(self, path: str | None = None, *, timeout: float = AGENT_TIMEOUT_S) -> None:
        self.path = os.environ.get("SSH_AUTH_SOCK", "") if path is None else path
        self.timeout = timeout
        self._client: asyncssh.SSHAgentClient | None = None
        self._lock: asyncio.Lock | None = None
        self._cached: tuple[float, AgentKeys] | None = None

    async def keys(self) -> AgentKeys:
        """The agent's keys now (reused for :data:`AGENT_CACHE_S`); never raises."""
        if not self.path:
            return AgentKeys("", problem="no agent (SSH_AUTH_SOCK is not set)")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = time.monotonic()
            if self._cached is not None:
                age, last = now - self._cached[0], self._cached[1]
                if age < (AGENT_FAILURE_CACHE_S if last.problem else AGENT_CACHE_S):
                    return last
            result = await self._ask()
            self._cached = (time.monotonic(), result)
            return result

    async def _ask(self) -> AgentKeys:
        if not Path(self.path).exists():
            return AgentKeys(self.path, problem=f"the agent socket {self.path} does not exist")
        if self._client is None:
            self._client = asyncssh.SSHAgentClient(self.path)
        try:
            pairs = await asyncio.wait_for(self._client.get_keys(), self.timeout)
        except TimeoutError:
            await self._drop()
            return AgentKeys(self.path, problem=(
                f"the agent at {self.path} did not answer within {self.timeout:.0f} s "
                "(restart ssh-agent or fix SSH_AUTH_SOCK)"))
        except (ValueError, OSError) as exc:
            await self._drop()
            return AgentKeys(self.path, problem=f"the agent at {self.path} is unusable ({exc})")
        return AgentKeys(self.path, list(pairs))

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.wait_closed(), 2)

    async def close(self) -> None:
        await self._drop()
        self._cached = None


@dataclass
class KeySet:
    """The keys offered to one host, in order (agent first), and what was left out."""

    keypairs: list[asyncssh.SSHKeyPair]
    files: list[IdentityFile]
    agent: AgentKeys | None

    def find(self, fingerprint: str) -> asyncssh.SSHKeyPair | None:
        """The key pair with this ``SHA256:`` fingerprint (agent or file), if offered."""
        for pair in self.keypairs:
            if fingerprint_of(pair.key_public_data) == fingerprint:
                return pair
        return None

    def problems(self) -> list[str]:
        """Why keys were left out (encrypted files not in the agent, missing files, agent)."""
        in_agent = {p.key_public_data for p in (self.agent.keypairs if self.agent else [])}
        out = [f.problem() for f in self.files
               if f.status != OK and not (f.public_blob and f.public_blob in in_agent)]
        if self.agent is not None and self.agent.problem and (
                not self.keypairs or any(f.status == ENCRYPTED for f in self.files)):
            out.append(self.agent.problem)
        return [p for p in out if p]

    def fix(self) -> str:
        """The one most useful thing to do when authentication failed."""
        for f in self.files:
            if f.status == ENCRYPTED and f.problem() in self.problems():
                return f"ssh-add {f.path}"
        if self.agent is not None and self.agent.problem and self.agent.path:
            return "restart ssh-agent (or point SSH_AUTH_SOCK at a live one), then ssh-add your key"
        return "check the identity file, the agent (SSH_AUTH_SOCK) and the host's authorized_keys"


_FILE_CACHE: dict[str, tuple[tuple[float, float], IdentityFile]] = {}


def _load_cached(path: str) -> IdentityFile:
    full = str(Path(path).expanduser())
    try:
        st = os.stat(full)
        stamp = (st.st_mtime, st.st_ctime)
    except OSError:
        return load_identity_file(path)
    hit = _FILE_CACHE.get(full)
    if hit is not None and hit[0] == stamp:
        return IdentityFile(path, hit[1].status, hit[1].keypairs, hit[1].public_blob, hit[1].detail)
    loaded = load_identity_file(path)
    _FILE_CACHE[full] = (stamp, loaded)
    return loaded


async def collect_keys(
    files: Sequence[str],
    agent: AgentSource | None,
    *,
    identities_only: bool = False,
    defaults_when_empty: bool = True,
) -> KeySet:
    """The keys to offer: agent keys first, then the files' keys (deduplicated).

    ``files`` empty and ``defaults_when_empty``: OpenSSH's default files, quietly
    skipping those that do not exist. ``identities_only``: only agent keys that match
    one of the files (ssh_config ``IdentitiesOnly yes``).
    """
    explicit = [f for f in dict.fromkeys(files) if f]
    if explicit:
        loaded = [_load_cached(f) for f in explicit]
    elif defaults_when_empty:
        loaded = [x for x in (_load_cached(f) for f in DEFAULT_IDENTITY_FILES) if x.status != MISSING]
    else:
        loaded = []
    agent_keys = await agent.keys() if agent is not None else None
    wanted = {f.public_blob for f in loaded if f.public_blob}
    pairs: list[asyncssh.SSHKeyPair] = []
    seen: set[bytes] = set()
    for pair in agent_keys.keypairs if agent_keys else []:
        if identities_only and pair.key_public_data not in wanted:
            continue
        if pair.public_data not in seen:
            seen.add(pair.public_data)
            pairs.append(pair)
    for f in loaded:
        for pair in f.keypairs:
            if pair.public_data not in seen:
                seen.add(pair.public_data)
                pairs.append(pair)
    return KeySet(pairs, loaded, agent_keys)
