"""The acting admin's SSH key: find it (agent, identity files, ``--admin-key``), sign, verify.

Two uses, one key:

* **Proof of possession.** Before any changing action the operator proves they hold
  the private key whose fingerprint the fleet file lists for the acting admin: a
  fresh random challenge is signed (by the SSH agent, or with a key file) and the
  signature is verified here, locally, against the public key whose SHA256
  fingerprint matches the fleet file. A key that merely *claims* a fingerprint
  proves nothing: only a signature that verifies does.
* **Signing audit entries** in the standard OpenSSH ``SSHSIG`` format (PROTOCOL.sshsig),
  so ``ssh-keygen -Y verify`` can check them as well as ``escort audit verify``.

Sources, in order: the SSH agent (``SSH_AUTH_SOCK``), then ``--admin-key FILE``, then
the fleet's ``identity_files``. An OpenSSH *user certificate* in the agent (or a
``FILE-cert.pub`` next to a key file) counts for the key it certifies.

Every way this can fail is an :class:`AdminKeyProblem` with a stable code and a
one-line message; nothing here raises anything else at a caller.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
from asyncssh.public_key import decode_ssh_certificate, decode_ssh_public_key

#: Key types accepted for admins (what ssh-keygen -Y sign produces signatures for).
ACCEPTED_TYPES = frozenset({
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
})
#: Smallest RSA key accepted (bits).
MIN_RSA_BITS = 2048
#: Namespaces (PROTOCOL.sshsig) so that a signature for one purpose is useless for the other.
NS_PROOF = "escort-admin-proof@escort"
NS_AUDIT = "escort-audit@escort"

_MAGIC = b"SSHSIG"
_HASH = "sha512"
_AGENT_TIMEOUT_S = 5.0


class AdminKeyProblem(Exception):
    """A key could not be found, read, used or verified; ``code`` is stable."""

    def __init__(self, code: str, message: str, fix: str = "") -> None:
        super().__init__(" ".join(message.split()))
        self.code = code
        self.fix = fix


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _read_string(buf: bytes, pos: int) -> tuple[bytes, int]:
    if pos + 4 > len(buf):
        raise ValueError("truncated")
    (n,) = struct.unpack(">I", buf[pos:pos + 4])
    end = pos + 4 + n
    if end > len(buf):
        raise ValueError("truncated")
    return buf[pos + 4:end], end


def fingerprint_of_blob(blob: bytes) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@dataclass
class AdminKey:
    """A private key the operator can use (in the agent or loaded from a file)."""

    public: asyncssh.SSHKey  # the plain public key (for a certificate: the certified key)
    source: str  # "ssh-agent" or a file path
    comment: str = ""
    certificate: str = ""  # "key id, principals" of an OpenSSH user certificate, if one came with it
    _agent_path: str = field(default="", repr=False)  # the agent socket holding the key
    _agent_blob: bytes = field(default=b"", repr=False)  # the key (or certificate) blob the agent lists
    _private: asyncssh.SSHKey | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        return str(self.public.get_fingerprint("sha256"))

    @property
    def algorithm(self) -> str:
        return self.public.get_algorithm()

    def public_line(self) -> str:
        return self.public.export_public_key("openssh").decode().strip()

    def _sig_algorithm(self) -> bytes:
        alg = self.public.get_algorithm().encode()
        return b"rsa-sha2-512" if alg == b"ssh-rsa" else alg

    async def raw_sign(self, data: bytes) -> bytes:
        """An SSH signature blob (string algorithm, string signature) over ``data``."""
        try:
            if self._private is not None:
                return bytes(self._private.sign(data, self._sig_algorithm()))
            if not self._agent_path:
                raise AdminKeyProblem("admin.key_missing", "no private key to sign with")
            # a connection of its own for every signature: the one that listed the keys is
            # long closed when an audit entry is signed minutes later
            client = await asyncio.wait_for(asyncssh.connect_agent(self._agent_path), _AGENT_TIMEOUT_S)
            try:
                pairs = await asyncio.wait_for(client.get_keys(), _AGENT_TIMEOUT_S)
                pair = next((p for p in pairs if bytes(p.public_data) == self._agent_blob), None)
                if pair is None:
                    raise AdminKeyProblem("admin.key_missing",
                                          f"the SSH agent no longer holds key {self.fingerprint}",
                                          "ssh-add the key again")
                pair.set_sig_algorithm(self._sig_algorithm())
                signing = pair.sign_async(data)  # type: ignore[attr-defined]
                sig = await asyncio.wait_for(signing, _AGENT_TIMEOUT_S)
            finally:
                client.close()
            return bytes(sig)
        except AdminKeyProblem:
            raise
        except (asyncssh.Error, OSError, ValueError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise AdminKeyProblem("admin.sign_failed",
                                  f"{self.source} did not sign with key {self.fingerprint} ({why})",
                                  "check the SSH agent (ssh-add -l) or the key file") from exc

    async def sshsig(self, message: bytes, namespace: str) -> str:
        """An armored ``SSHSIG`` signature of ``message`` (what ``ssh-keygen -Y sign`` writes)."""
        digest = hashlib.sha512(message).digest()
        to_sign = (_MAGIC + _string(namespace.encode()) + _string(b"") + _string(_HASH.encode())
                   + _string(digest))
        sig = await self.raw_sign(to_sign)
        blob = (_MAGIC + struct.pack(">I", 1) + _string(bytes(self.public.public_data))
                + _string(namespace.encode()) + _string(b"") + _string(_HASH.encode()) + _string(sig))
        text = base64.b64encode(blob).decode()
        lines = [text[i:i + 70] for i in range(0, len(text), 70)]
        return "-----BEGIN SSH SIGNATURE-----\n" + "\n".join(lines) + "\n-----END SSH SIGNATURE-----\n"


def sshsig_verify(armored: str, message: bytes, namespace: str) -> str:
    """Verify an armored SSHSIG over ``message``; returns the signer's SHA256 fingerprint.

    Raises :class:`AdminKeyProblem` (``audit.signature``) when it does not verify.
    """
    def bad(why: str) -> AdminKeyProblem:
        return AdminKeyProblem("signature.invalid", why)

    text = armored.strip()
    head, tail = "-----BEGIN SSH SIGNATURE-----", "-----END SSH SIGNATURE-----"
    if not (text.startswith(head) and text.endswith(tail)):
        raise bad("not an SSH signature (no BEGIN/END SSH SIGNATURE lines)")
    try:
        blob = base64.b64decode("".join(text[len(head):-len(tail)].split()), validate=True)
        if not blob.startswith(_MAGIC):
            raise ValueError("magic")
        pos = len(_MAGIC)
        (version,) = struct.unpack(">I", blob[pos:pos + 4])
        pos += 4
        pub, pos = _read_string(blob, pos)
        ns, pos = _read_string(blob, pos)
        reserved, pos = _read_string(blob, pos)
        hash_alg, pos = _read_string(blob, pos)
        sig, pos = _read_string(blob, pos)
    except (ValueError, struct.error) as exc:
        raise bad("the SSH signature is malformed") from exc
    if version != 1:
        raise bad(f"SSH signature version {version} is not supported")
    if ns.decode(errors="replace") != namespace:
        raise bad(f"the signature is for namespace {ns.decode(errors='replace')!r}, not {namespace!r}")
    if hash_alg not in (b"sha512", b"sha256"):
        raise bad("the signature uses an unknown hash algorithm")
    try:
        key = decode_ssh_public_key(pub)
    except (asyncssh.KeyImportError, ValueError) as exc:
        raise bad("the signature's public key cannot be read") from exc
    digest = (hashlib.sha512 if hash_alg == b"sha512" else hashlib.sha256)(message).digest()
    signed = _MAGIC + _string(ns) + _string(reserved) + _string(hash_alg) + _string(digest)
    if not key.verify(signed, sig):
        raise bad("the signature does not verify (the entry or the signature was changed)")
    return fingerprint_of_blob(pub)


def _cert_text(cert: object) -> str:
    """``key id (principals)`` of an OpenSSH certificate, for display."""
    key_id = getattr(cert, "_key_id", "")
    principals = list(getattr(cert, "principals", []) or [])
    return f"{key_id} ({', '.join(principals) or 'any principal'})"


def _check_type(key: asyncssh.SSHKey, source: str) -> None:
    alg = key.get_algorithm()
    if alg not in ACCEPTED_TYPES:
        raise AdminKeyProblem("admin.key_type", f"{source}: a {alg} key cannot prove an admin",
                              "use an Ed25519, ECDSA or RSA (>= 2048 bits) key")
    if alg == "ssh-rsa":
        bits = getattr(getattr(key, "pyca_key", None), "key_size", None)
        if bits is not None and bits < MIN_RSA_BITS:
            raise AdminKeyProblem("admin.key_type", f"{source}: RSA key of {bits} bits is too short",
                                  f"use a key of at least {MIN_RSA_BITS} bits (or Ed25519)")


PassphrasePrompt = Callable[[str], str]


def load_key_file(path: str, *, passphrase: PassphrasePrompt | None = None) -> AdminKey:
    """A private key file as an :class:`AdminKey`; one-line problems for every failure."""
    p = Path(path).expanduser()
    try:
        # non-blocking open: a named pipe given as the key must not hang the action in open()
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as fh:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise AdminKeyProblem("admin.key_unreadable", f"{path}: not a regular file (a private "
                                      "SSH key is a file)", "give the path of the admin's private SSH key")
            os.set_blocking(fd, True)
            data = fh.read(64 * 1024 + 1)
    except FileNotFoundError as exc:
        raise AdminKeyProblem("admin.key_unreadable", f"{path}: no such key file",
                              "give the path of the admin's private SSH key") from exc
    except OSError as exc:
        raise AdminKeyProblem("admin.key_unreadable", f"{path}: cannot read ({exc.strerror or exc})",
                              "check the key file's permissions") from exc
    if len(data) > 64 * 1024:
        raise AdminKeyProblem("admin.key_unreadable", f"{path}: not a private SSH key (too big)")
    try:
        key = asyncssh.import_private_key(data)
    except asyncssh.KeyImportError as exc:
        if "assphrase" not in str(exc):
            raise AdminKeyProblem("admin.key_type", f"{path}: not a private SSH key ({exc})",
                                  "give an OpenSSH private key (ssh-keygen -t ed25519)") from exc
        if passphrase is None:
            raise AdminKeyProblem("admin.key_encrypted",
                                  f"{path}: the key is encrypted and no passphrase prompt is available "
                                  "(not on a terminal)",
                                  f"load it into the SSH agent first (ssh-add {path})") from exc
        try:
            key = asyncssh.import_private_key(data, passphrase(f"Passphrase for {path}: "))
        except Exception as exc2:  # wrong passphrase, or no bcrypt for OpenSSH's KDF
            raise AdminKeyProblem("admin.key_encrypted", f"{path}: cannot decrypt the key ({exc2})",
                                  f"load it into the SSH agent (ssh-add {path})") from exc2
    except (ValueError, TypeError) as exc:
        raise AdminKeyProblem("admin.key_type", f"{path}: not a private SSH key ({exc})") from exc
    if mode & 0o077:
        # what OpenSSH refuses too ("UNPROTECTED PRIVATE KEY FILE"): a private key that others
        # on this machine can read proves nothing about who is acting
        raise AdminKeyProblem("admin.key_unprotected",
                              f"{path}: permissions {mode & 0o777:04o} are too open: others can read this "
                              "private key, so it cannot prove who is acting",
                              f"chmod 600 {path} (and ask whether others have copied it)")
    _check_type(key, path)
    pub = decode_ssh_public_key(bytes(key.public_data))
    cert_text = ""
    cert_path = Path(str(p) + "-cert.pub")
    if cert_path.is_file():
        with contextlib.suppress(Exception):
            cert = asyncssh.read_certificate(str(cert_path))
            if bytes(cert.key.public_data) == bytes(pub.public_data):
                cert_text = _cert_text(cert)
    return AdminKey(pub, str(path), key.get_comment() or "", cert_text, _private=key)


@dataclass
class AgentKeys:
    """What the SSH agent offered: keys, or why there is no agent."""

    keys: list[AdminKey]
    problem: AdminKeyProblem | None = None
    _client: object | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()  # type: ignore[attr-defined]
            self._client = None


async def agent_keys(agent_path: str | None = None) -> AgentKeys:
    """Keys in the SSH agent (``SSH_AUTH_SOCK``); a problem instead when there is none."""
    path = agent_path if agent_path is not None else os.environ.get("SSH_AUTH_SOCK", "")
    if not path:
        return AgentKeys([], AdminKeyProblem(
            "admin.no_agent", "no SSH agent (SSH_AUTH_SOCK is not set)",
            "start ssh-agent and ssh-add the admin's key, or pass --admin-key FILE"))
    try:
        client = await asyncio.wait_for(asyncssh.connect_agent(path), _AGENT_TIMEOUT_S)
        pairs = await asyncio.wait_for(client.get_keys(), _AGENT_TIMEOUT_S)
    except (OSError, asyncssh.Error, TimeoutError, ValueError) as exc:
        return AgentKeys([], AdminKeyProblem(
            "admin.no_agent", f"the SSH agent at {path} does not answer ({str(exc) or type(exc).__name__})",
            "start ssh-agent (eval $(ssh-agent)) and ssh-add the admin's key"))
    if client is None:
        return AgentKeys([], AdminKeyProblem("admin.no_agent", f"no SSH agent at {path}",
                                             "start ssh-agent and ssh-add the admin's key"))
    keys: list[AdminKey] = []
    seen: set[str] = set()
    for pair in pairs:
        cert_text = ""
        try:
            blob = bytes(pair.public_data)
            if pair.has_cert:
                cert = decode_ssh_certificate(blob)
                pub = cert.key
                cert_text = _cert_text(cert)
            else:
                pub = decode_ssh_public_key(blob)
        except (asyncssh.KeyImportError, ValueError):
            continue  # a key type this asyncssh cannot read: not usable for a proof
        key = AdminKey(pub, "ssh-agent", pair.get_comment() or "", cert_text, _agent_path=path,
                       _agent_blob=bytes(pair.public_data))
        fp = key.fingerprint
        if fp in seen and not cert_text:
            continue
        seen.add(fp)
        keys.append(key)
    return AgentKeys(keys, None, client)


async def prove(key: AdminKey, expected_fingerprint: str) -> str:
    """Sign a fresh random challenge with ``key`` and verify it against ``expected_fingerprint``.

    Returns the challenge's hex digest (recorded in the audit log). The signature is
    verified with the public key parsed from the signature itself, and that key's
    fingerprint must equal the fleet file's: a key that claims a fingerprint proves
    nothing, a signature that verifies does.
    """
    try:
        _check_type(key.public, key.source)
    except AdminKeyProblem:
        raise
    challenge = os.urandom(32)
    armored = await key.sshsig(challenge, NS_PROOF)
    try:
        signer = sshsig_verify(armored, challenge, NS_PROOF)
    except AdminKeyProblem as exc:
        # what came back is not a signature of this challenge by the key that was listed: an
        # agent that lists one key and signs with another, or replays an old signature
        raise AdminKeyProblem("admin.key_mismatch",
                              f"{key.source} listed key {key.fingerprint}, but what it returned is not "
                              f"that key's signature of this fresh challenge ({exc})",
                              "use an SSH agent or key file that really holds the admin's key") from exc
    if signer != expected_fingerprint:
        raise AdminKeyProblem("admin.key_mismatch",
                              f"the key from {key.source} is {signer}, "
                              f"not the admin's {expected_fingerprint}",
                              "use the admin's own key")
    return hashlib.sha256(challenge).hexdigest()


def matching(keys: Iterable[AdminKey], fingerprint: str) -> AdminKey | None:
    return next((k for k in keys if k.fingerprint == fingerprint), None)


__all__ = ["ACCEPTED_TYPES", "NS_AUDIT", "NS_PROOF", "AdminKey", "AdminKeyProblem", "AgentKeys",
           "PassphrasePrompt", "agent_keys", "fingerprint_of_blob", "load_key_file", "matching", "prove",
           "sshsig_verify"]
