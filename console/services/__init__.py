"""Services: one API for the CLI and the UI (read-only mode is enforced here).

``fleet.FleetService`` is the offline part (fleet file, trust checks, decisions);
``inventory`` refreshes hosts over SSH/libvirt and feeds ``FleetService.apply_facts``.
"""
