"""The trust store: a trust directory's CAs linked into a tree, one subject index, queries."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence

from cryptography import x509

from ..errors import InputError
from ..reasons import Reason
from .attributes import aki_of, cert_info, fields_of
from .checks import aki_matches, signed_by, weak_signature
from .model import CANode, ChainResult, CRLInfo, MissingCRL, Problem, utc
from .paths import PathBuilder
from .pem import load_certificates
from .revocation import attach_crls, revoked_by

#: Every CA of a store under its subject name; built once per store and shared by the
#: linking, CRL attachment and issuer lookups.
SubjectIndex = dict[x509.Name, list[CANode]]


def index_by_subject(nodes: Iterable[CANode]) -> SubjectIndex:
    index: SubjectIndex = {}
    for n in nodes:
        index.setdefault(n.info.cert.subject, []).append(n)
    return index


class TrustStore(PathBuilder):
    """The CA tree of one trust directory, with cached per-CA path checks."""

    anchors: list[CANode]

    def __init__(self, nodes: list[CANode], *, at: dt.datetime, crls: Sequence[CRLInfo] = (),
                 problems: Sequence[Problem] = (), missing_crl: MissingCRL = "refuse",
                 loose_crls: Sequence[tuple[str, bytes]] = ()) -> None:
        self._nodes = nodes
        self.anchors = [n for n in nodes if n.anchor]
        self.at = at
        self.crls = list(crls)
        self.problems = list(problems)
        #: A CA without any CRL: refuse (revocation unknown) or warn; see ``revocation``.
        self.missing_crl: MissingCRL = missing_crl
        self.loose_crls = list(loose_crls)
        self._by_subject: SubjectIndex = index_by_subject(nodes)
        self._by_fp: dict[str, CANode] = {n.info.fingerprint: n for n in nodes}
        self._init_caches()
        self._by_subject_der = {}
        for n in nodes:  # while the bytes they were read from are at hand (attributes.facts)
            self._signature_check(n)
            fields = fields_of(n.info.cert)
            if fields is not None:
                self._by_subject_der[fields[3]] = self._by_subject[n.info.cert.subject]

    # ---------------------------------------------------------------- building
    @classmethod
    def build(
        cls,
        certs: Iterable[tuple[str, bytes]],
        crls: Iterable[tuple[str, bytes]] = (),
        *,
        at: dt.datetime,
        missing_crl: MissingCRL = "refuse",
    ) -> tuple[TrustStore, list[Problem]]:
        """Parse, link and check a trust directory's contents; see the module docstring.

        ``missing_crl="warn"`` downgrades "this CA has no CRL at all" from a refusal to a
        warning (the fleet file's ``missing_crl``); stale, forged or unusable CRLs refuse
        regardless.
        """
        at = utc(at)
        problems: list[Problem] = []
        nodes: list[CANode] = []
        seen: set[str] = set()
        for source, data in certs:
            try:
                parsed = load_certificates(data, source)
            except InputError as exc:
                problems.append(Problem(source, Reason(
                    "file.invalid", str(exc), "Remove the file or replace it with a CA certificate.")))
                continue
            for i, cert in enumerate(parsed):
                where = source if len(parsed) == 1 else f"{source}[{i + 1}]"
                try:
                    info = cert_info(cert, where)
                except InputError as exc:
                    problems.append(Problem(where, Reason("file.invalid", str(exc), "Remove the file.")))
                    continue
                if info.fingerprint in seen:
                    continue
                seen.add(info.fingerprint)
                nodes.append(CANode(info))
        cas = [n for n in nodes if n.info.is_ca]
        if not cas:
            raise InputError("no CA certificates in the trust directory"
                             + (f" ({len(nodes)} non-CA certificate(s) found)" if nodes else ""))
        for n in nodes:
            if not n.info.is_ca:
                problems.append(Problem(n.info.source, Reason(
                    "trust.not_ca",
                    f"{n.info.name} is not a CA certificate (basicConstraints CA is not set).",
                    "Keep only CA certificates and CRLs in the trust directory.",
                    severity="warning")))
        index = index_by_subject(nodes)
        link_nodes(nodes, index, problems)
        loose: list[tuple[str, bytes]] = []
        crl_infos = attach_crls(index, crls, at, problems, loose)
        for n in nodes:
            for parent in n.issuers:
                if parent.crl is not None and revoked_by(parent, n.info.serial, at) is not None:
                    n.revoked = True
                    n.revocation_reason = parent.crl.reason_for(n.info.serial)
            n.crl_stale = n.crl is not None and n.crl.is_stale(at)
        store = cls(nodes, at=at, crls=crl_infos, problems=problems, missing_crl=missing_crl,
                    loose_crls=loose)
        return store, problems

    # ---------------------------------------------------------------- queries
    def nodes(self) -> list[CANode]:
        return list(self._nodes)

    def by_fingerprint(self, fingerprint: str) -> CANode | None:
        return self._by_fp.get(fingerprint.lower().replace(":", ""))

    def issuer_of(self, cert: x509.Certificate) -> CANode | None:
        """The CA in this store that signed ``cert`` (the tree's "hangs under")."""
        aki = (aki_of(cert) or b"").hex()
        for node in self._by_subject.get(cert.issuer, ()):
            if aki_matches(cert, node.info, aki) and signed_by(cert, node.info.cert):
                return node
        return None

    def check_ca(self, node: CANode, at: dt.datetime) -> ChainResult:
        """The path checks of one CA (for the trust view): valid, reasons, chain."""
        at = utc(at)
        res = self._path(node, at, 0)
        errors = res.errors  # the path starts at ``node``: its own checks are included
        return ChainResult(valid=not errors, reasons=errors,
                           warnings=res.warnings, chain=tuple(n.info for n in res.path),
                           ca_fingerprints=res.fingerprints, leaf=node.info, ca_names=res.names)

    # ---------------------------------------------------------------- leaf checks
    def verify_host(self, cert: x509.Certificate, at: dt.datetime, *,
                    intermediates: Iterable[x509.Certificate] = ()) -> ChainResult:
        """Every check a hypervisor host certificate must pass at ``at``.

        ``intermediates`` (e.g. the rest of a full-chain file) may fill gaps between the
        host certificate and the trust directory; they are checked like the stored CAs.
        """
        return self._verify(cert, list(intermediates), utc(at), "host")

    def verify_owner(
        self, cert: x509.Certificate, intermediates: Iterable[x509.Certificate], at: dt.datetime
    ) -> ChainResult:
        """Chain an owner's signing certificate (from a JWS x5c) to this store's anchors.

        Same checks as hosts, but the leaf needs keyUsage digitalSignature and
        extendedKeyUsage emailProtection (no serverAuth/clientAuth), and
        ``intermediates`` (the rest of x5c) may fill gaps. A valid result carries
        ``owner_identity`` (issuing CA key + subject + e-mail).
        """
        return self._verify(cert, list(intermediates), utc(at), "owner")


def link_nodes(nodes: list[CANode], by_subject: SubjectIndex, problems: list[Problem]) -> None:
    """Parent links by name + AKI/SKI + signature; shortest path from an anchor wins.

    Breadth-first from the anchors, so cross-signed CAs that point at each other can
    never make this loop; whatever is not reached is either under a missing root or
    in a loop, and is reported as such.
    """
    issued: dict[int, list[CANode]] = {}
    bad_sig: dict[int, Reason] = {}
    for n in nodes:
        cert = n.info.cert
        # An anchor's self-signature carries no trust, so an old root signed with SHA-1
        # (which cryptography will not check) is still an anchor.
        if n.info.self_issued and aki_matches(cert, n.info) and (
                signed_by(cert, cert) or weak_signature(cert, "") is not None):
            if n.info.is_ca:
                n.anchor = True
            else:
                n.untrusted = Reason("chain.no_anchor", f"{n.info.name} is self-signed but not a CA.",
                                     "Use a CA certificate as root.")
            continue
        named = [p for p in by_subject.get(cert.issuer, []) if p is not n]
        n.issuers = [p for p in named if aki_matches(cert, p.info) and signed_by(cert, p.info.cert)]
        for p in n.issuers:
            issued.setdefault(id(p), []).append(n)
        if named and not n.issuers:
            bad_sig[id(n)] = Reason(
                "trust.signature",
                f"{n.info.name}'s signature does not verify with the key of {named[0].info.name}.",
                f"Replace {n.info.source} with the CA certificate {named[0].info.name} really issued.")
            problems.append(Problem(n.info.source, bad_sig[id(n)]))
    # BFS from anchors.
    reached: set[int] = set()
    queue = sorted((n for n in nodes if n.anchor), key=lambda n: (n.info.name, n.info.fingerprint))
    reached.update(id(n) for n in queue)
    while queue:
        nxt: list[CANode] = []
        for p in queue:
            for child in issued.get(id(p), []):
                if id(child) in reached or child.anchor:
                    continue
                reached.add(id(child))
                child.parent = p
                p.children.append(child)
                nxt.append(child)
        queue = nxt
    reported_loops: set[frozenset[int]] = set()
    for n in nodes:
        if id(n) in reached or n.untrusted is not None:
            continue
        # Unreached nodes only have unreached issuers: follow the first one until we
        # meet a node already explained, a node without issuer (missing root) or a loop.
        walk: list[CANode] = []
        pos: dict[int, int] = {}
        cur: CANode | None = n
        while cur is not None and id(cur) not in pos and cur.untrusted is None:
            pos[id(cur)] = len(walk)
            walk.append(cur)
            cur = cur.issuers[0] if cur.issuers else None
        in_cycle: set[int] = set()
        if cur is not None and id(cur) in pos:
            cycle = walk[pos[id(cur)]:]
            in_cycle = {id(c) for c in cycle}
            names = " -> ".join(c.info.name for c in [*cycle, cycle[0]])
            reason = Reason("trust.loop",
                            f"CA certificates sign each other in a loop with no self-signed root: {names}.",
                            "Add the self-signed root these CAs chain to, or remove the loop's certificates.")
            if frozenset(in_cycle) not in reported_loops:
                reported_loops.add(frozenset(in_cycle))
                problems.append(Problem(", ".join(c.info.source for c in cycle), reason))
        elif cur is None and id(walk[-1]) in bad_sig:
            reason = bad_sig[id(walk[-1])]  # already reported: its named issuer did not sign it
        elif cur is None:
            top = walk[-1]
            reason = Reason("trust.no_root",
                            f"{top.info.name}'s issuer {top.info.issuer} is not in the trust directory, "
                            "so it leads to no root.",
                            f"Add the certificate of {top.info.issuer} (up to a self-signed root).")
            problems.append(Problem(top.info.source, reason))
        else:
            reason = cur.untrusted or Reason("chain.no_anchor", "no root", "Add the root CA.")
        for c in walk:
            c.untrusted = reason
            c.parent = c.issuers[0] if c.issuers else None
            # No children links inside a loop, so walking the tree downwards always ends.
            if c.parent is not None and id(c) not in in_cycle:
                c.parent.children.append(c)


