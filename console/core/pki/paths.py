"""Path building: from a certificate up through its issuers to a trust anchor, every check on the way."""

from __future__ import annotations

import datetime as dt
import threading
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509 import verification as xv

from ..errors import InputError
from ..reasons import Reason
from .attributes import cert_info, key_usage, name_constraints_of
from .checks import aki_matches, key_problem, signed_by, usage_reasons, validity_reasons, weak_signature
from .model import MAX_PATH_DEPTH, CANode, CertInfo, CertKind, ChainResult
from .names import name_constraint_failures
from .revocation import crl_stale_warning


@dataclass(frozen=True)
class PathResult:
    """Cached checks of one CA's path up to its anchor, for one ``at`` and offset."""

    path: tuple[CANode, ...]  # the CA first, anchor last
    errors: tuple[Reason, ...]
    warnings: tuple[Reason, ...]
    constraints: tuple[tuple[CertInfo, x509.NameConstraints], ...]
    fingerprints: frozenset[str]
    names: tuple[str, ...]
    cross_checkable: bool  # no Ed25519/Ed448 key on the path: the verifier applies


class PathBuilder:
    """Path checks and their caches; ``TrustStore`` supplies the CA index."""

    _by_subject: dict[x509.Name, list[CANode]]
    cross_check: bool

    def _init_caches(self) -> None:
        # Caches are filled from UI/service worker threads too: lookups are plain dict
        # reads, eviction happens under this lock (a duplicate computation is harmless).
        self._lock = threading.Lock()
        self._cache: dict[dt.datetime, dict[tuple[int, int], PathResult]] = {}
        self._verifiers: dict[tuple[int, dt.datetime], xv.ClientVerifier] = {}
        #: (leaf fingerprint, issuer node id) -> signature verified. Signatures do not
        #: depend on time, so a console refreshing 1,000 hosts pays for them once.
        self._signatures: dict[tuple[str, int], bool] = {}


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

    def _compute_path(self, node: CANode, at: dt.datetime, offset: int) -> PathResult:
        path = node.path_to_root()
        errors: list[Reason] = []
        warnings: list[Reason] = []
        constraints: list[tuple[CertInfo, x509.NameConstraints]] = []
        below = offset  # non-self-issued intermediates between the leaf and this CA
        cross_checkable = True
        for i, n in enumerate(path):
            info = n.info
            errors += validity_reasons(info, at, "ca", "CA")
            if not info.is_ca:
                errors.append(Reason("ca.not_ca", f"{info.name} issued a certificate but is not a CA "
                                     "(basicConstraints CA is not set).",
                                     f"Reissue {info.name} as a CA certificate."))
            if info.path_len is not None and below > info.path_len:
                errors.append(Reason("ca.path_len", f"{info.name} allows {info.path_len} intermediate "
                                     f"CA(s) below it (pathLen), this path has {below}.",
                                     f"Issue the certificate from a CA closer to {info.name}, or reissue "
                                     f"{info.name} with a larger pathLen."))
            ku = key_usage(info.cert)
            if ku is not None and not ku.key_cert_sign:
                errors.append(Reason("ca.no_keycertsign", f"{info.name}'s keyUsage lacks keyCertSign, "
                                     "so it may not sign certificates.",
                                     f"Reissue {info.name} with keyUsage keyCertSign."))
            kp = key_problem(info.cert, f"CA {info.name}")
            if kp is not None:
                errors.append(kp)
            if not n.anchor:  # an anchor's self-signature carries no trust
                weak = weak_signature(info.cert, f"CA {info.name}")
                if weak is not None:
                    errors.append(weak)
            if info.key_type in ("Ed25519", "Ed448"):
                cross_checkable = False
            nc = name_constraints_of(info.cert)
            if nc is not None:
                constraints.append((info, nc))
                # RFC 5280 6.1.4(b): the constraints also bind the CAs below it on this
                # path (except self-issued ones); the leaf is checked per certificate.
                for lower in path[:i]:
                    if not lower.info.self_issued:
                        errors += name_constraint_failures(lower.info.cert, info, nc, lower.info.name)
            if i + 1 < len(path):
                parent = path[i + 1]
                when = parent.crl.revoked_at(info.serial, at) if parent.crl else None
                if when is not None:
                    errors.append(Reason("ca.revoked", f"CA {info.name} was revoked by {parent.info.name} "
                                         f"on {when:%Y-%m-%d}.",
                                         "Use a CA that is not revoked, or reissue it from "
                                         f"{parent.info.name}."))
            stale = crl_stale_warning(n, at)
            if stale is not None:
                warnings.append(stale)
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
        return PathResult(path=tuple(path), errors=tuple(errors), warnings=tuple(warnings),
                           constraints=tuple(constraints),
                           fingerprints=frozenset(n.info.fingerprint for n in path),
                           names=tuple(n.info.name for n in path), cross_checkable=cross_checkable)

    def _verify(self, cert: x509.Certificate, extras: list[x509.Certificate], at: dt.datetime,
                kind: CertKind) -> ChainResult:
        try:
            leaf = cert_info(cert)
        except InputError as exc:
            return ChainResult(False, (Reason("cert.malformed", str(exc), "Reissue the certificate."),))
        who = "Host certificate" if kind == "host" else "Owner certificate"
        errors: list[Reason] = []
        warnings: list[Reason] = []
        errors += validity_reasons(leaf, at, "cert", who)
        for problem in (key_problem(cert, f"{who} {leaf.name}"),
                        weak_signature(cert, f"{who} {leaf.name}")):
            if problem is not None:
                errors.append(problem)
        errors += usage_reasons(cert, leaf, kind)

        # Walk up: extra intermediates only where the store has no signer.
        extra_infos: list[CertInfo] = []
        current, current_info = cert, leaf
        issuer_node: CANode | None = None
        unused = list(extras)
        for _ in range(MAX_PATH_DEPTH):
            found = self._best_issuer(current, current_info, at, len(extra_infos))
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

        # Checks of the extra intermediates (not cached: they are not in the store).
        for j, info in enumerate(extra_infos):
            errors += validity_reasons(info, at, "ca", "CA")
            if not info.is_ca:
                errors.append(Reason("ca.not_ca", f"{info.name} issued a certificate but is not a CA.",
                                     f"Reissue {info.name} as a CA certificate."))
            if info.path_len is not None and j > info.path_len:
                errors.append(Reason("ca.path_len", f"{info.name} allows {info.path_len} intermediate "
                                     f"CA(s) below it (pathLen), this path has {j}.",
                                     "Shorten the path or reissue with a larger pathLen."))
            ku = key_usage(info.cert)
            if ku is not None and not ku.key_cert_sign:
                errors.append(Reason("ca.no_keycertsign", f"{info.name}'s keyUsage lacks keyCertSign.",
                                     f"Reissue {info.name} with keyUsage keyCertSign."))
            for problem in (key_problem(info.cert, f"CA {info.name}"),
                            weak_signature(info.cert, f"CA {info.name}")):
                if problem is not None:
                    errors.append(problem)

        chain: list[CertInfo] = [leaf, *extra_infos]
        fingerprints: frozenset[str] = frozenset(i.fingerprint for i in extra_infos)
        names: tuple[str, ...] = tuple(i.name for i in extra_infos)
        constraints: list[tuple[CertInfo, x509.NameConstraints]] = [
            (i, nc) for i in extra_infos if (nc := name_constraints_of(i.cert)) is not None]
        cross_checkable = leaf.key_type not in ("Ed25519", "Ed448")
        path: tuple[CANode, ...] = ()
        if issuer_node is not None:
            res = self._path(issuer_node, at, len(extra_infos))
            path = res.path
            errors += res.errors
            warnings += res.warnings
            chain += [n.info for n in res.path]
            fingerprints |= res.fingerprints
            names += res.names
            constraints += res.constraints
            cross_checkable = cross_checkable and res.cross_checkable
            # Revocation: the leaf (or the lowest extra intermediate) by the issuer's CRL.
            below = extra_infos[-1] if extra_infos else leaf
            when = issuer_node.crl.revoked_at(below.serial, at) if issuer_node.crl else None
            if when is not None:
                code = "cert.revoked" if below is leaf else "ca.revoked"
                errors.append(Reason(code, f"{below.name} was revoked by {issuer_node.info.name} on "
                                     f"{when:%Y-%m-%d}.",
                                     "Issue a new certificate; a revoked one cannot be reinstated."))
        for ca, nc in constraints:
            errors += name_constraint_failures(cert, ca, nc, leaf.name)

        errors = list(dict.fromkeys(errors))
        if (not errors and self.cross_check and cross_checkable and path and path[-1].anchor
                and not any(i.key_type in ("Ed25519", "Ed448") for i in extra_infos)):
            problem = self._cross_check(cert, [i.cert for i in extra_infos] + [n.info.cert for n in path],
                                        at)
            if problem is not None:
                errors.append(problem)
        return ChainResult(valid=not errors, reasons=tuple(errors), warnings=tuple(warnings),
                           chain=tuple(chain), ca_fingerprints=fingerprints, leaf=leaf, ca_names=names)

    def _signed_by_node(self, cert: x509.Certificate, info: CertInfo, node: CANode) -> bool:
        key = (info.fingerprint, id(node))
        ok = self._signatures.get(key)
        if ok is None:
            if len(self._signatures) >= 200_000:
                with self._lock:
                    self._signatures.clear()
            ok = self._signatures[key] = signed_by(cert, node.info.cert)
        return ok

    def _best_issuer(self, cert: x509.Certificate, info: CertInfo, at: dt.datetime,
                     offset: int) -> CANode | Reason:
        """The store CA that signed ``cert`` with the fewest path errors, or why none did."""
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

    def _cross_check(self, cert: x509.Certificate, path: list[x509.Certificate],
                     at: dt.datetime) -> Reason | None:
        """Run cryptography's verifier over a path that passed our own checks.

        Extension policies are relaxed to ``permit_all`` because EKU/keyUsage/policies are
        checked above with escort's own (non-Web-PKI) rules; what remains is the
        verifier's path validation: signatures, validity, basicConstraints, pathLen,
        name constraints and its algorithm allow-list.
        """
        anchor = path[-1]
        key = (id(anchor), at)
        verifier = self._verifiers.get(key)
        if verifier is None:
            if len(self._verifiers) >= 64:
                with self._lock:
                    self._verifiers.pop(next(iter(self._verifiers)), None)
            # The verifier insists that a CA policy requires basicConstraints; it is
            # the one extension we leave to it (our own check runs first anyway).
            ca_policy = xv.ExtensionPolicy.permit_all().require_present(
                x509.BasicConstraints, xv.Criticality.AGNOSTIC, None)
            verifier = self._verifiers[key] = (
                xv.PolicyBuilder().store(xv.Store([anchor])).time(at).max_chain_depth(MAX_PATH_DEPTH)
                .extension_policies(ca_policy=ca_policy, ee_policy=xv.ExtensionPolicy.permit_all())
                .build_client_verifier()
            )
        try:
            verifier.verify(cert, path[:-1])
        except (xv.VerificationError, ValueError) as exc:
            return Reason("chain.verifier",
                          f"cryptography's path validation rejects the chain: {exc}.",
                          "Reissue the certificate or CA with standard algorithms and extensions.")
        return None



