"""escort: a terminal operator console for certificate-gated VM migration."""

__version__ = "0.1.0"
