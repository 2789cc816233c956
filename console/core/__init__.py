"""The pure domain: PKI, policies, grants, decisions, plans.

Nothing here performs I/O or imports textual, asyncssh or libvirt; callers pass
bytes in and get values out. tests/unit/test_import_hygiene.py enforces it.
"""
