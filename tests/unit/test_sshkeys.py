"""Client key loading (console/adapters/sshkeys.py): no prompts, encrypted files named."""

from __future__ import annotations

import subprocess
from pathlib import Path

import asyncssh
import pytest

from console.adapters import sshkeys


def _keygen(path: Path, passphrase: str) -> None:
    """Encrypted keys from the real ssh-keygen (asyncssh cannot write them without bcrypt)."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    paths = {"plain": tmp_path / "id_plain", "enc": tmp_path / "id_enc", "enc_nopub": tmp_path / "id_np"}
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(paths["plain"])
    _keygen(paths["enc"], "secret")
    paths["enc_nopub"].write_bytes(paths["enc"].read_bytes())  # the same key, no .pub beside it
    return paths


def test_files_load_without_any_passphrase(keys: dict[str, Path], tmp_path: Path) -> None:
    ok = sshkeys.load_identity_file(str(keys["plain"]))
    assert ok.status == sshkeys.OK and ok.keypairs and ok.problem() == ""
    enc = sshkeys.load_identity_file(str(keys["enc"]))
    assert enc.status == sshkeys.ENCRYPTED and not enc.keypairs
    assert enc.problem() == (f"{keys['enc']} is encrypted and its key is not in the agent "
                             f"(run: ssh-add {keys['enc']})")
    # the public key of an encrypted OpenSSH key is read from its clear-text header
    no_pub = sshkeys.load_identity_file(str(keys["enc_nopub"]))
    assert no_pub.status == sshkeys.ENCRYPTED and no_pub.public_blob == enc.public_blob
    assert enc.fingerprint.startswith("SHA256:")
    missing = sshkeys.load_identity_file(str(tmp_path / "nope"))
    assert missing.status == sshkeys.MISSING and "does not exist" in missing.problem()
    junk = tmp_path / "junk"
    junk.write_text("not a key\n")
    assert sshkeys.load_identity_file(str(junk)).status == sshkeys.UNREADABLE


async def test_collect_keys_names_what_was_left_out(keys: dict[str, Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    agent = sshkeys.AgentSource()
    ks = await sshkeys.collect_keys([str(keys["enc"]), str(keys["plain"]), str(tmp_path / "gone")], agent)
    assert len(ks.keypairs) == 1  # the plain file only
    problems = ks.problems()
    assert any("ssh-add" in p for p in problems) and any("does not exist" in p for p in problems)
    assert ks.fix() == f"ssh-add {keys['enc']}"
    assert ks.find(sshkeys.load_identity_file(str(keys["plain"])).fingerprint) is ks.keypairs[0]
    silent = sshkeys.AgentSource(str(tmp_path / "no-agent.sock"))
    answer = await silent.keys()
    assert answer.keypairs == [] and "does not exist" in answer.problem
    await agent.close()
    await silent.close()
