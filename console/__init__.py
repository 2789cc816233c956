"""escort: a terminal operator console for certificate-gated VM migration."""

import os as _os

__version__ = "0.1.0"

#: Where libvirt's own client-library log goes (see _quiet_libvirt_log).
LIBVIRT_LOG_ENV = "LIBVIRT_LOG_OUTPUTS"


def libvirt_client_log() -> str:
    """The file libvirt's client-library warnings go to instead of the terminal."""
    base = _os.environ.get("XDG_STATE_HOME") or _os.path.join(_os.path.expanduser("~"), ".local", "state")
    return _os.path.join(base, "escort", "libvirt-client.log")


def _quiet_libvirt_log() -> None:
    """Keep libvirt's own log lines (e.g. "Guest X probably left in 'paused' state on
    source", printed by the client library during a failed migration) off the terminal
    and the console's screen: libvirt reads ``LIBVIRT_LOG_OUTPUTS`` once, when the
    library initialises, so it is set here, before anything imports libvirt. escort
    checks and reports what matters in its own words; the raw lines stay in a file.
    An operator's own LIBVIRT_LOG_OUTPUTS / LIBVIRT_DEBUG is left alone.
    """
    if LIBVIRT_LOG_ENV in _os.environ or "LIBVIRT_DEBUG" in _os.environ:
        return
    path = libvirt_client_log()
    try:
        _os.makedirs(_os.path.dirname(path), mode=0o700, exist_ok=True)
    except OSError:
        path = _os.devnull
    _os.environ[LIBVIRT_LOG_ENV] = f"3:file:{path}"


_quiet_libvirt_log()
