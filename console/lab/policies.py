"""Owner-signed placement policies for the lab's guests (core/policy.py does the work).

Each guest's owner (alice or bob, certificates from the lab's owners' CA) signs a
policy naming the CAs they trust (by SHA-256 fingerprint) and the host attributes
they require; the token goes into the domain's ``<metadata>`` so it travels with
the VM on migration.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from cryptography.x509.oid import NameOID

from console.core.envelope import fingerprint

if TYPE_CHECKING:
    from .certs import LabPKI
    from .hosts import GuestPlan, HostPlan

POLICY_DAYS = 365


def token_for(pki: LabPKI, guest: GuestPlan, vm_uuid: str, *, at: dt.datetime | None = None) -> str:
    """The compact JWS policy for ``guest`` signed by its owner."""
    from console.core import policy

    owner = pki.owners[guest.owner]
    now = at or dt.datetime.now(dt.UTC)
    trusted = []
    for ca_name in guest.trust:
        issuer = pki.root if ca_name == "root" else pki.intermediates[ca_name]
        cns = issuer.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = str(cns[0].value) if cns else issuer.cert.subject.rfc4514_string()
        trusted.append((cn, fingerprint(issuer.cert)))
    payload = policy.build_policy_payload(
        owner=guest.owner,
        vm_uuid=vm_uuid,
        vm_name=guest.name,
        trusted_cas=trusted,
        require={key: list(values) for key, values in guest.require},
        not_before=now - dt.timedelta(minutes=5),
        not_after=now + dt.timedelta(days=POLICY_DAYS),
        labels=guest.labels,
    )
    return policy.sign_policy(payload, owner.key, [owner.cert])


def metadata_for(pki: LabPKI, host: HostPlan, guest: GuestPlan, vm_uuid: str) -> str:
    """The ``<escort:policy>`` element for the domain XML's ``<metadata>``."""
    from console.core import policy

    del host  # the policy is about the VM, not where it happens to start
    return policy.policy_metadata_xml(token_for(pki, guest, vm_uuid))
