"""A small CA toolkit on top of the ``openssl`` CLI (a tool nobody on the project wrote).

Used by the tests that check escort's certificate verdict against certificates and
CRLs an organisation would make with openssl: every CA gets an ``openssl ca``
database so that ``-revoke`` and ``-gencrl`` (with ``-crlexts``, ``-crl_lastupdate``
and ``-crl_nextupdate``) work the way they do for real.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CNF = """[ ca ]
default_ca = CA_default
[ CA_default ]
dir = .
database = $dir/{name}.index
new_certs_dir = $dir
certificate = $dir/{name}.pem
private_key = $dir/{name}.key
crlnumber = $dir/{name}.crlnumber
default_md = sha256
default_crl_days = 30
unique_subject = no
[ crl_ext ]
authorityKeyIdentifier = keyid:always
{crl_ext}
"""


def run(cwd: Path, *args: str) -> str:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "OPENSSL_CONF": "/dev/null"})
    assert out.returncode == 0, f"openssl {' '.join(args)}: {out.stderr}"
    return out.stdout


@dataclass
class CA:
    name: str
    dir: Path

    @property
    def pem(self) -> Path:
        return self.dir / f"{self.name}.pem"


class Tree:
    """CAs and end-entity certificates in one directory (EC P-256 keys unless told)."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self._serial = 0x1000

    def _key(self, name: str, key: str) -> None:
        if key == "ed25519":
            run(self.d, "genpkey", "-algorithm", "ed25519", "-out", f"{name}.key")
        elif key == "rsa":
            run(self.d, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
                "-out", f"{name}.key")
        else:
            run(self.d, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out",
                f"{name}.key")

    def _db(self, name: str) -> None:
        (self.d / f"{name}.index").write_text("")
        (self.d / f"{name}.crlnumber").write_text("01\n")

    def root(self, name: str, subj: str, *, ext: Sequence[str] = (), key: str = "ec") -> CA:
        self._key(name, key)
        lines = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign",
                 "subjectKeyIdentifier=hash", *ext]
        (self.d / f"{name}.ext").write_text("\n".join(lines) + "\n")
        run(self.d, "req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", subj)
        self._serial += 1
        run(self.d, "x509", "-req", "-in", f"{name}.csr", "-key", f"{name}.key", "-out", f"{name}.pem",
            "-days", "3650", "-set_serial", str(self._serial), "-extfile", f"{name}.ext")
        self._db(name)
        return CA(name, self.d)

    def issue(self, issuer: CA, name: str, subj: str, ext: Sequence[str], *, key: str = "ec",
              days: int = 365, serial: int | None = None) -> Path:
        """A certificate signed by ``issuer`` with exactly the extension lines ``ext``
        (``serial``: this serial number, even zero or negative, as openssl allows)."""
        self._key(name, key)
        (self.d / f"{name}.ext").write_text("\n".join(ext) + "\n")
        run(self.d, "req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", subj)
        self._serial += 1
        run(self.d, "x509", "-req", "-in", f"{name}.csr", "-CA", issuer.pem.name, "-CAkey",
            f"{issuer.name}.key", "-out", f"{name}.pem", "-days", str(days), "-set_serial",
            str(self._serial if serial is None else serial), "-extfile", f"{name}.ext")
        return self.d / f"{name}.pem"

    def ca(self, issuer: CA, name: str, subj: str, *, ext: Sequence[str] = (), key: str = "ec",
           serial: int | None = None) -> CA:
        lines = ["basicConstraints=critical,CA:TRUE", "keyUsage=critical,keyCertSign,cRLSign",
                 "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid:always", *ext]
        self.issue(issuer, name, subj, lines, key=key, days=1825, serial=serial)
        self._db(name)
        return CA(name, self.d)

    def host(self, issuer: CA, name: str, *, policies: str = "", extra: Sequence[str] = (),
             ca_true: bool = False, key: str = "ec", san: str = "", serial: int | None = None) -> Path:
        lines = [f"basicConstraints=critical,CA:{'TRUE' if ca_true else 'FALSE'}",
                 "keyUsage=critical,digitalSignature,keyEncipherment",
                 "extendedKeyUsage=serverAuth,clientAuth", f"subjectAltName={san or 'DNS:' + name}",
                 "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid",
                 *([f"certificatePolicies={policies}"] if policies else []), *extra]
        return self.issue(issuer, name, f"/C=DE/L=Frankfurt/O=Acme/CN={name}", lines, key=key,
                          serial=serial)

    def revoke(self, issuer: CA, cert: Path) -> None:
        (self.d / f"{issuer.name}.cnf").write_text(CNF.format(name=issuer.name, crl_ext=""))
        run(self.d, "ca", "-config", f"{issuer.name}.cnf", "-revoke", str(cert), "-crl_reason",
            "keyCompromise")

    def crl(self, issuer: CA, out: str, *, ext: Sequence[str] = (), last: str | None = None,
            nxt: str | None = None, number: int | None = None) -> Path:
        """``openssl ca -gencrl`` by ``issuer`` (its revocations so far) with extra CRL extensions.

        ``last``/``nxt`` are openssl times (YYYYMMDDHHMMSSZ); ``number`` sets the CRL number.
        """
        (self.d / f"{issuer.name}.cnf").write_text(CNF.format(name=issuer.name, crl_ext="\n".join(ext)))
        if number is not None:
            (self.d / f"{issuer.name}.crlnumber").write_text(f"{number:02X}\n")
        args = ["ca", "-config", f"{issuer.name}.cnf", "-gencrl", "-crlexts", "crl_ext", "-out", out]
        if last:
            args += ["-crl_lastupdate", last]
        if nxt:
            args += ["-crl_nextupdate", nxt]
        run(self.d, *args)
        return self.d / out
