"""Path building: from a certificate up through its issuers to a trust anchor, every check on the way.

``PathBuilder._verify`` is THE certificate verdict: ``TrustStore.verify_host`` and
``TrustStore.verify_owner`` call it, and every command and screen (``cert verify``,
explain/targets, pre-flight, evacuation, drain, the console, policy and grant
signers) goes through those two. On the way up it applies, to every certificate:

* the leaf: dates, key, signature algorithm, keyUsage/EKU for its kind (host: TLS
  server+client; owner: digitalSignature + emailProtection), end-entity only
  (CA:FALSE), no critical extension escort does not process;
* every CA (from the trust directory *and* from a chain file or x5c — the same
  ``checks.ca_reasons``): dates, CA:TRUE, pathLen, keyCertSign, key, algorithm, no
  unknown critical extension;
* name constraints of every CA on the path, applied to every certificate below it
  (``names``);
* revocation of every certificate by its issuer's CRL, failing closed
  (``revocation``);
* certificate policies: a leaf policy OID counts only when every CA between the leaf
  and the trust anchor asserts it or anyPolicy (``ChainResult.policies``).

Everything that depends only on a stored CA is computed once per CA per ``at`` and
cached.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import CertificatePoliciesOID

from ..errors import InputError
from ..reasons import Reason
from .attributes import cert_info, ext, facts, fields_of, name_constraints_of
from .checks import (
    SignatureCheck,
    aki_matches,
    ca_reasons,
    critical_extension_reasons,
    end_entity_reasons,
    key_problem,
    owner_usage_reasons,
    signed_by,
    usage_reasons,
    validity_reasons,
    weak_signature,
)
from .model import MAX_PATH_DEPTH, CANode, CertInfo, CertKind, ChainResult, MissingCRL
from .names import name_constraint_failures
from .revocation import attach_crls, revocation_reasons

ANY_POLICY = CertificatePoliciesOID.ANY_POLICY.dotted_string


@dataclass(frozen=True)
class PolicyState:
    """Certificate policies asserted by every CA so far (top down), RFC 5280 6.1 simplified.

    ``oids is None`` means "anything" (no CA yet, or all asserted anyPolicy).
    ``inhibited``: a CA above carried inhibitAnyPolicy, so anyPolicy below it counts for
    nothing (stricter than RFC 5280's skipCerts, documented in docs/PKI.md).
    """

    oids: frozenset[str] | None = None
    inhibited: bool = False

    def through(self, info: CertInfo) -> PolicyState:
        asserted = set(info.policies)
        inhibited = self.inhibited
        if ANY_POLICY in asserted and not inhibited:
            own: frozenset[str] | None = None
        else:
            own = frozenset(asserted - {ANY_POLICY})
        if own is None:
            oids = self.oids
        elif self.oids is None:
            oids = own
        else:
            oids = self.oids & own
        if ext(info.cert, x509.InhibitAnyPolicy) is not None:
            inhibited = True
        return PolicyState(oids, inhibited)

    def effective(self, leaf: CertInfo) -> frozenset[str]:
        mine = frozenset(leaf.policies) - {ANY_POLICY}
        return mine if self.oids is None else mine & self.oids


@dataclass(frozen=True)
class PathResult:
    """Cached checks of one stored CA's path up to its anchor, for one ``at`` and offset."""

    path: tuple[CANode, ...]  # the CA first, anchor last
    errors: tuple[Reason, ...]
    warnings: tuple[Reason, ...]
    constraints: tuple[tuple[CertInfo, x509.NameConstraints], ...]  # of every CA on the path
    fingerprints: frozenset[str]
    names: tuple[str, ...]
    policies: PolicyState  # after the lowest CA of the path
    infos: tuple[CertInfo, ...] = ()  # ``path``'s infos (a chain's tail, shared by its certificates)


def _spki_sha256(cert: x509.Certificate) -> str:
    f = facts(cert)  # an issuer's key digest, asked again for every certificate it issued
    if f.spki_sha256 is None:
        try:
            der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
        except Exception:  # unsupported key: no identity (the key check refuses it anyway)
            f.spki_sha256 = ""
        else:
            f.spki_sha256 = hashlib.sha256(der).hexdigest()
    return f.spki_sha256


class PathBuilder:
    """Path checks and their caches; ``TrustStore`` supplies the CA index and CRLs."""

    _by_subject: dict[x509.Name, list[CANode]]
    #: a stored CA's subject as the DER it was read from -> ``_by_subject`` of that name
    _by_subject_der: dict[bytes, list[CANode]]
    missing_crl: MissingCRL
    at: dt.datetime
    #: CRLs whose issuer is not a stored CA: kept for CAs that arrive in a chain file/x5c.
    loose_crls: list[tuple[str, bytes]]

    def _init_caches(self) -> None:
        # Caches are filled from UI/service worker threads too: lookups are plain dict
        # reads, eviction happens under this lock (a duplicate computation is harmless).
        self._lock = threading.Lock()
        self._cache: dict[dt.datetime, dict[tuple[int, int], PathResult]] = {}
        #: (leaf fingerprint, issuer node id) -> signature verified. Signatures do not
        #: depend on time, so a console refreshing 1,000 hosts pays for them once.
        self._signatures: dict[tuple[str, int], bool] = {}
        #: id(CA node) -> (the node, its side of a signature check): ``_signature_check``
        self._sig_checks: dict[int, tuple[CANode, SignatureCheck]] = {}
        #: Extra (chain file / x5c) CAs as nodes with the CRLs that name them.
        self._extra_nodes: dict[str, CANode] = {}
        self._busy = threading.local()

    # ---------------------------------------------------------------- path cache
    def _path(self, node: CANode, at: dt.datetime, offset: int) -> PathResult:
        per_at = self._cache.get(at)
        if per_at is None:
            with self._lock:
                if len(self._cache) >= 8:  # callers passing "now" each time must not grow this forever
                    self._cache.pop(next(iter(self._cache)), None)
                per_at = self._cache.setdefault(at, {})
        key = (id(node), offset)
        hit = per_at.get(key)
        if hit is None:
            hit = per_at[key] = self._compute_path(node, at, offset)
        return hit

    def _signer_ok(self, at: dt.datetime) -> _SignerCheck:
        return _SignerCheck(self, at)

    def _compute_path(self, node: CANode, at: dt.datetime, offset: int) -> PathResult:
        path = node.path_to_root()
        errors: list[Reason] = []
        warnings: list[Reason] = []
        constraints: list[tuple[CertInfo, x509.NameConstraints]] = []
        below = offset  # non-self-issued intermediates between the leaf and this CA
        signer_ok = self._signer_ok(at)
        for i, n in enumerate(path):
            info = n.info
            errors += ca_reasons(info, at, below, anchor=n.anchor)
            nc = name_constraints_of(info.cert)
            if nc is not None:
                constraints.append((info, nc))
                # RFC 5280 6.1.4(b): the constraints also bind the CAs below it on this
                # path (except self-issued ones); the leaf is checked per certificate.
                for lower in path[:i]:
                    if not lower.info.self_issued:
                        errors += name_constraint_failures(lower.info.cert, info, nc, lower.info.name)
            if i + 1 < len(path):
                for r in revocation_reasons(info, path[i + 1], at, self.missing_crl, signer_ok, leaf=False):
                    (warnings if r.severity == "warning" else errors).append(r)
            if not info.self_issued:
                below += 1
        top = path[-1]
        if not top.anchor:
            why = top.untrusted
            errors.append(Reason(
                "chain.no_anchor",
                why.message if why else f"{top.info.name} does not lead to a self-signed root "
                                        "in the trust directory.",
                why.fix if why else "Add the root CA certificate to the trust directory."))
        policies = PolicyState()
        for n in reversed(path):
            if not n.anchor:  # RFC 5280: the trust anchor's own policies do not constrain
                policies = policies.through(n.info)
        return PathResult(path=tuple(path), errors=tuple(dict.fromkeys(errors)),
                          warnings=tuple(dict.fromkeys(warnings)), constraints=tuple(constraints),
                          fingerprints=frozenset(n.info.fingerprint for n in path),
                          names=tuple(n.info.name for n in path), policies=policies,
                          infos=tuple(n.info for n in path))

    def _extra_node(self, info: CertInfo) -> CANode:
        """A CA from a chain file / x5c as a node, with the trust directory's CRLs for it."""
        hit = self._extra_nodes.get(info.fingerprint)
        if hit is None:
            hit = CANode(info)
            if self.loose_crls:
                attach_crls({info.cert.subject: [hit]}, self.loose_crls, self.at, [])
            with self._lock:
                if len(self._extra_nodes) > 4096:
                    self._extra_nodes.clear()
                self._extra_nodes[info.fingerprint] = hit
        return hit

    # ---------------------------------------------------------------- the verdict
    def _verify(self, cert: x509.Certificate, extras: list[x509.Certificate], at: dt.datetime,
                kind: CertKind) -> ChainResult:
        """THE certificate verdict (see the module docstring): every failing check."""
        try:
            leaf = cert_info(cert)
        except InputError as exc:
            return ChainResult(False, (Reason("cert.malformed", str(exc), "Reissue the certificate."),),
                               kind=kind)
        who = "Host certificate" if kind == "host" else "Owner certificate"
        label = f"{who} {leaf.name}"
        errors: list[Reason] = []
        warnings: list[Reason] = []
        errors += validity_reasons(leaf, at, "cert", who)
        for problem in (key_problem(cert, label), weak_signature(cert, label)):
            if problem is not None:
                errors.append(problem)
        errors += end_entity_reasons(leaf, kind)
        errors += usage_reasons(cert, leaf, kind)
        if kind == "owner":
            errors += owner_usage_reasons(cert, leaf)
        errors += critical_extension_reasons(cert, label, "cert.critical_extension")

        # Walk up: extra intermediates only where the store has no signer.
        extra_infos: list[CertInfo] = []
        current, current_info = cert, leaf
        issuer_node: CANode | None = None
        unused = list(extras)
        for _ in range(MAX_PATH_DEPTH):
            below_extras = sum(1 for i in extra_infos if not i.self_issued)
            found = self._best_issuer(current, current_info, at, below_extras)
            if isinstance(found, CANode):
                issuer_node = found
                break
            nxt = next((e for e in unused if e.subject == current.issuer and signed_by(current, e)), None)
            if nxt is None:
                errors.append(found)
                break
            unused.remove(nxt)
            try:
                nxt_info = cert_info(nxt, "x5c/intermediate")
            except InputError as exc:
                errors.append(Reason("cert.malformed", str(exc), "Fix the intermediate certificates."))
                break
            extra_infos.append(nxt_info)
            current, current_info = nxt, nxt_info
        else:
            errors.append(Reason("chain.too_long", f"the path from {leaf.name} is longer than "
                                 f"{MAX_PATH_DEPTH} certificates.", "Use a shorter CA hierarchy."))

        # The extra intermediates get the same CA check as the stored ones.
        below = 0
        for info in extra_infos:
            errors += ca_reasons(info, at, below, anchor=False)
            if not info.self_issued:
                below += 1

        signer_ok = self._signer_ok(at)
        if not extra_infos and issuer_node is not None:
            # the common case, a certificate issued by a stored CA: the path's parts as computed
            # once per CA (shared by every certificate it issued)
            res = self._path(issuer_node, at, below)
            errors += res.errors
            warnings += res.warnings
            chain: list[CertInfo] | tuple[CertInfo, ...] = (leaf, *res.infos)
            fingerprints = res.fingerprints
            names: tuple[str, ...] = res.names
            constraints: list[tuple[CertInfo, x509.NameConstraints]] | tuple[
                tuple[CertInfo, x509.NameConstraints], ...] = res.constraints
            policies = res.policies
        else:
            chain = [leaf, *extra_infos]
            fingerprints = frozenset(i.fingerprint for i in extra_infos)
            names = tuple(i.name for i in extra_infos)
            # Name constraints of every CA on the whole path, lowest first.
            constraints = [(i, nc) for i in extra_infos if (nc := name_constraints_of(i.cert)) is not None]
            policies = PolicyState()
            if issuer_node is not None:
                res = self._path(issuer_node, at, below)
                errors += res.errors
                warnings += res.warnings
                chain += [n.info for n in res.path]
                fingerprints |= res.fingerprints
                names += res.names
                constraints += res.constraints
                policies = res.policies
            for info in reversed(extra_infos):
                policies = policies.through(info)

        # Name constraints: each extra CA against every CA above it, the leaf against all.
        for j, info in enumerate(extra_infos):
            if info.self_issued:
                continue
            above = [(ca, nc) for ca, nc in constraints if ca is not info
                     and (ca not in extra_infos or extra_infos.index(ca) > j)]
            for ca, nc in above:
                errors += name_constraint_failures(info.cert, ca, nc, info.name)
        for ca, nc in constraints:
            errors += name_constraint_failures(cert, ca, nc, leaf.name)

        # Revocation of the leaf and of every extra CA by its issuer.
        if extra_infos:
            issuers: list[CANode | None] = [*(self._extra_node(i) for i in extra_infos), issuer_node]
        else:
            issuers = [issuer_node]
        for info, issuer, is_leaf in zip([leaf, *extra_infos], issuers, [True] + [False] * len(extra_infos),
                                         strict=True):
            if issuer is None:
                break
            for r in revocation_reasons(info, issuer, at, self.missing_crl, signer_ok, leaf=is_leaf):
                (warnings if r.severity == "warning" else errors).append(r)

        issuer_cert = (extra_infos[0].cert if extra_infos
                       else issuer_node.info.cert if issuer_node is not None else None)
        errors = list(dict.fromkeys(errors))
        return ChainResult(valid=not errors, reasons=tuple(errors), warnings=tuple(dict.fromkeys(warnings)),
                           chain=tuple(chain), ca_fingerprints=fingerprints, leaf=leaf, ca_names=names,
                           policies=policies.effective(leaf),
                           issuer_key=_spki_sha256(issuer_cert) if issuer_cert is not None else "",
                           kind=kind)

    def _signed_by_node(self, cert: x509.Certificate, info: CertInfo, node: CANode) -> bool:
        key = (info.fingerprint, id(node))
        ok = self._signatures.get(key)
        if ok is None:
            if len(self._signatures) >= 200_000:
                with self._lock:
                    self._signatures.clear()
            # the CA's key read once (``checks.SignatureCheck``); whatever it does not confirm,
            # cryptography's ``verify_directly_issued_by`` decides
            ok = self._signatures[key] = (self._signature_check(node).signed(cert, fields_of(cert))
                                          or signed_by(cert, node.info.cert))
        return ok

    def _signature_check(self, node: CANode) -> SignatureCheck:
        """``node``'s side of a signature check, made once (it holds the node: no other node
        can get its entry by reusing an id)."""
        hit = self._sig_checks.get(id(node))
        if hit is None or hit[0] is not node:
            cert = node.info.cert
            hit = (node, SignatureCheck(cert, fields_of(cert)))
            with self._lock:
                if len(self._sig_checks) > 4096:
                    self._sig_checks.clear()
                self._sig_checks[id(node)] = hit
        return hit[1]

    def _best_issuer(self, cert: x509.Certificate, info: CertInfo, at: dt.datetime,
                     offset: int) -> CANode | Reason:
        """The store CA that signed ``cert`` with the fewest path errors, or why none did."""
        fields = fields_of(cert)
        # by the issuer's bytes when a stored CA has exactly them as its subject (the same
        # list the parsed name finds: equal bytes, equal names), else by the parsed name
        named = self._by_subject_der.get(fields[2]) if fields is not None else None
        if named is None:
            named = self._by_subject.get(cert.issuer)
        if not named:
            return Reason("chain.no_issuer",
                          f"No CA named {info.issuer} is in the trust directory (issuer of {info.name}).",
                          "Add the issuing CA's certificate (and its root) to the trust directory.")
        candidates = [n for n in named if n.info.cert is not cert and aki_matches(cert, n.info)]
        signers = [n for n in candidates if self._signed_by_node(cert, info, n)]
        if not signers and candidates and weak_signature(cert, "") is not None:
            # cryptography cannot check SHA-1/MD5 signatures at all; the weak-signature
            # reason already fails the certificate, so follow the named issuer to report
            # the rest of the path too instead of a misleading "wrong key".
            signers = candidates[:1]
        if not signers:
            return Reason("chain.signature",
                          f"The signature on {info.name} does not verify with the key of "
                          f"{named[0].info.name} in the trust directory.",
                          "The certificate was signed by a different key with the same CA name; "
                          "get the right CA certificate or reissue the certificate.")
        if len(signers) == 1:
            return signers[0]
        return min(signers, key=lambda n: len(self._path(n, at, offset).errors))


class _SignerCheck:
    """Is the certificate of a CRL signer (another certificate of the same CA) valid at ``at``?"""

    def __init__(self, builder: PathBuilder, at: dt.datetime) -> None:
        self.builder = builder
        self.at = at

    def __call__(self, signer: CANode) -> bool:
        busy: set[int] = getattr(self.builder._busy, "ids", None) or set()
        if id(signer) in busy:  # a CRL signer whose own check needs this check: not usable
            return False
        busy.add(id(signer))
        self.builder._busy.ids = busy
        try:
            return not self.builder._path(signer, self.at, 0).errors
        finally:
            busy.discard(id(signer))
