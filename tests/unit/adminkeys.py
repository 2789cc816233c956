"""Real SSH keys for tests of the admin's proof of possession (no mocks: asyncssh makes them)."""

from __future__ import annotations

from pathlib import Path

import asyncssh


def make_key(directory: Path, name: str = "admin", alg: str = "ssh-ed25519") -> tuple[Path, str]:
    """Write an unencrypted OpenSSH private key (and .pub); returns (path, SHA256 fingerprint)."""
    key = asyncssh.generate_private_key(alg)
    path = directory / f"{name}_key"
    key.write_private_key(str(path))
    path.chmod(0o600)
    key.write_public_key(str(path) + ".pub")
    return path, str(key.get_fingerprint("sha256"))
