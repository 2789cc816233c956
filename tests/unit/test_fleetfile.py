"""The fleet file: strict keys, one-line errors with the key path, paths relative to the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from console.adapters.fleetfile import load_fleet, parse_fleet
from console.core.errors import InputError

MIN = 'name = "f"\nkind = "demo"\ntrust_dir = "t"\nowners_trust_dir = "o"\n'
UUID = "6f1c1e1a-8d7b-4c36-9d61-2a3f6a0b9e11"


def parse(text: str) -> object:
    return parse_fleet(text, "fleet.toml", "/srv/fleet")


def test_minimal_and_relative_paths() -> None:
    spec = parse(MIN + 'known_hosts = "~/kh"\ngrants = ["g/a.jws"]\n'
                 '[[hosts]]\nname = "h1"\ncert_file = "c/h1.pem"\n')
    assert spec.trust_dir == "/srv/fleet/t" and spec.owners_trust_dir == "/srv/fleet/o"  # type: ignore[attr-defined]
    assert spec.hosts[0].cert_file == "/srv/fleet/c/h1.pem"  # type: ignore[attr-defined]
    assert spec.hosts[0].remote_cert == "/etc/pki/qemu/server-cert.pem"  # type: ignore[attr-defined]
    assert spec.grant_files == ("/srv/fleet/g/a.jws",)  # type: ignore[attr-defined]
    assert not spec.known_hosts.startswith("~")  # type: ignore[attr-defined]


@pytest.mark.parametrize(("text", "where"), [
    (MIN + "trust-dir = 'x'\n", "fleet.toml: trust-dir: unknown key"),
    ('name = "f"\nkind = "demo"\ntrust_dir = "t"\n', "fleet.toml: owners_trust_dir: missing"),
    (MIN.replace('"demo"', '"prod"'), "fleet.toml: kind: must be one of demo, lab, real"),
    (MIN + "readonly = 1\n", "fleet.toml: readonly: expected true/false, got an integer"),
    (MIN + "stall_timeout_s = true\n", "fleet.toml: stall_timeout_s: expected an integer or a number"),
    (MIN + "[[hosts]]\nname = 'a'\n[[hosts]]\nname = 'b'\ncert_file = 3\n",
     "fleet.toml: hosts[1].cert_file: expected a string, got an integer"),
    (MIN + "[[hosts]]\nname = 'a'\nportt = 22\n", "fleet.toml: hosts[0].portt: unknown key"),
    (MIN + "[[hosts]]\nname = 'a'\n[[hosts]]\nname = 'a'\n", "fleet.toml: hosts[1].name: 'a' appears twice"),
    (MIN + f"[[vms]]\nuuid = '{UUID}'\nname = 'v'\nhost = 'nope'\n", "fleet.toml: vms[0].host:"),
    (MIN + "[[vms]]\nuuid = 'xyz'\nname = 'v'\nhost = ''\n", "fleet.toml: vms[0].uuid:"),
    (MIN + "[[admins]]\nid = 'a'\nssh_key_fingerprint = 'MD5:aa'\n",
     "fleet.toml: admins[0].ssh_key_fingerprint:"),
    (MIN + "[policy_names]\n'x' = 'not-an-oid'\n", "fleet.toml: policy_names.x:"),
    (MIN + "grants = [1]\n", "fleet.toml: grants[0]: expected a string"),
    (MIN + "hosts = 3\n", "fleet.toml: hosts: expected a list"),
    (MIN + "[[hosts]]\n", "fleet.toml: hosts[0].name: missing"),
    ("name = \n", "fleet.toml: not valid TOML"),
])
def test_errors_are_one_line_with_key_path(text: str, where: str) -> None:
    with pytest.raises(InputError) as err:
        parse(text)
    msg = str(err.value)
    assert msg.startswith(where), msg
    assert "\n" not in msg


def test_load_fleet_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such fleet file"):
        load_fleet(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not UTF-8"):
        load_fleet(tmp_path / "bin.toml")
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (1024 * 1024 + 10))
    with pytest.raises(InputError, match="larger than"):
        load_fleet(big)


def test_load_fleet_resolves_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "fleet.toml"
    f.write_text(MIN)
    spec = load_fleet(f)
    assert spec.trust_dir == str((tmp_path / "sub" / "t").resolve())
    assert spec.base_dir == str((tmp_path / "sub").resolve())


def test_the_documented_example_parses() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "FLEET.md").read_text()
    start = doc.index("```toml\n") + len("```toml\n")
    example = doc[start:doc.index("```", start)]
    spec = parse_fleet(example, "FLEET.md", "/srv/fleet")
    assert spec.hosts and spec.vms and spec.admins and spec.grant_files
