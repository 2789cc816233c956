"""RFC 5280 name constraints: DNS, IP and directory-name subtrees, permitted and excluded."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.x509.oid import NameOID

from ..reasons import Reason
from .attributes import gn_text, subject_alt_names
from .model import CertInfo


def dns_matches(name: str, constraint: str) -> bool:
    """RFC 5280 4.2.1.10 DNS subtree match (case-insensitive, label-aligned)."""
    name, constraint = name.lower().rstrip("."), constraint.lower().rstrip(".")
    if not constraint:
        return True
    if constraint.startswith("."):
        return name.endswith(constraint)
    return name == constraint or name.endswith("." + constraint)


def general_name_matches(name: x509.GeneralName, subtree: x509.GeneralName) -> bool | None:
    """True/False when ``subtree`` constrains names of ``name``'s type, None otherwise."""
    if isinstance(name, x509.DNSName) and isinstance(subtree, x509.DNSName):
        return dns_matches(name.value, subtree.value)
    if isinstance(name, x509.IPAddress) and isinstance(subtree, x509.IPAddress):
        net = subtree.value
        addr = name.value
        if isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network) and isinstance(
                addr, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return addr.version == net.version and addr in net
        return False
    if isinstance(name, x509.DirectoryName) and isinstance(subtree, x509.DirectoryName):
        want = list(subtree.value.rdns)
        return list(name.value.rdns)[: len(want)] == want
    if isinstance(name, x509.RFC822Name) and isinstance(subtree, x509.RFC822Name):
        return email_matches(name.value, subtree.value)
    if type(name) is type(subtree):
        raise _Unsupported(subtree)
    return None


class _Unsupported(Exception):
    """A subtree of a name type escort does not evaluate (URI, otherName...)."""

    def __init__(self, subtree: x509.GeneralName) -> None:
        super().__init__(gn_text(subtree))
        self.subtree = subtree


def email_matches(address: str, constraint: str) -> bool:
    """RFC 5280 4.2.1.10 rfc822Name constraints: a mailbox, a host, or ".domain" (subdomains)."""
    address, constraint = address.lower(), constraint.lower()
    if "@" in constraint:
        return address == constraint
    host = address.rpartition("@")[2]
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint


def name_constraint_failures(cert: x509.Certificate, ca: CertInfo,
                              nc: x509.NameConstraints, leaf_name: str) -> list[Reason]:
    """Check a certificate's names against one CA's name constraints (RFC 5280 4.2.1.10).

    Evaluated: DNS names (``example.net`` = the domain and its subdomains,
    ``.example.net`` = subdomains only, as OpenSSL and Go read it), IP addresses
    (CIDR), directory names (the subject, RDN prefix) and e-mail addresses (SAN
    rfc822Name and the subject's emailAddress). A constraint on any other name type
    that the certificate carries a name of (URI, otherName...) refuses: escort does
    not evaluate it, so it cannot say the name is allowed.
    """
    san = subject_alt_names(cert)
    names: list[x509.GeneralName] = list(san) if san else []
    if len(cert.subject):
        names.append(x509.DirectoryName(cert.subject))
        if not any(isinstance(n, x509.RFC822Name) for n in names):
            for attr in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
                names.append(x509.RFC822Name(str(attr.value)))
    out: list[Reason] = []
    for name in names:
        try:
            out += _check_name(name, ca, nc, leaf_name)
        except _Unsupported as exc:
            out.append(Reason(
                "name.unsupported",
                f"{ca.name} constrains names of a kind escort does not evaluate ({exc}), and "
                f"{leaf_name} carries one ({gn_text(name)}).",
                f"Issue {leaf_name} without {gn_text(name)}, or use a CA without that constraint."))
    return out


def _check_name(name: x509.GeneralName, ca: CertInfo, nc: x509.NameConstraints,
                leaf_name: str) -> list[Reason]:
    out: list[Reason] = []
    for sub in nc.excluded_subtrees or ():
        if general_name_matches(name, sub):
            out.append(Reason(
                "name.constraints",
                f"{leaf_name}'s name {gn_text(name)} is excluded by {ca.name}'s name constraints "
                f"({gn_text(sub)}).",
                f"Issue the certificate without {gn_text(name)}, or from a CA allowed to "
                "issue that name."))
    permitted = nc.permitted_subtrees or []
    relevant = [m for m in (general_name_matches(name, sub) for sub in permitted) if m is not None]
    if relevant and not any(relevant):  # constrained type, but no permitted subtree matches
        out.append(Reason(
            "name.constraints",
            f"{leaf_name}'s name {gn_text(name)} is outside {ca.name}'s permitted names "
            f"({', '.join(gn_text(s) for s in permitted)}).",
            f"Issue the certificate with names inside {ca.name}'s permitted subtrees."))
    return out


