"""cryptography's x509.verification as a cross-check in the tests (never a gate).

escort's own checks are the verdict (console/core/pki/paths.py). cryptography's
verifier is a Web-PKI verifier: it stops at the first error, rejects Ed25519 CA keys,
takes no CRLs and reads a leading-dot DNS name constraint as malformed. Where it *can*
judge a chain, the two must agree; ``judge`` says None where it cannot.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.x509 import verification as xv


def _edwards(cert: x509.Certificate) -> bool:
    return isinstance(cert.public_key(), ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)


def _leading_dot_constraints(certs: Sequence[x509.Certificate]) -> bool:
    for c in certs:
        try:
            nc = c.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound:
            continue
        for sub in [*(nc.permitted_subtrees or ()), *(nc.excluded_subtrees or ())]:
            if isinstance(sub, x509.DNSName) and sub.value.startswith("."):
                return True
    return False


def judge(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
          anchor: x509.Certificate, at: dt.datetime) -> bool | None:
    """cryptography's verdict on the path (True/False), or None where it cannot judge."""
    path = [leaf, *intermediates, anchor]
    if any(_edwards(c) for c in path) or _leading_dot_constraints(path):
        return None
    ca_policy = xv.ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, xv.Criticality.AGNOSTIC, None)
    verifier = (xv.PolicyBuilder().store(xv.Store([anchor])).time(at).max_chain_depth(8)
                .extension_policies(ca_policy=ca_policy, ee_policy=xv.ExtensionPolicy.permit_all())
                .build_client_verifier())
    try:
        verifier.verify(leaf, list(intermediates))
    except (xv.VerificationError, ValueError):
        return False
    return True
