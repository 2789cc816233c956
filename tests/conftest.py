"""Suite-wide rules.

With ESCORT_REQUIRE_LAB=1 (set by ``./dev test`` as root, hence in CI) a lab test
that is skipped or not collected fails the run: lab tests never count as passing
without running.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_LAB = os.environ.get("ESCORT_REQUIRE_LAB") == "1"


def pytest_configure(config: pytest.Config) -> None:
    """Tests never read or write the user's own escort state (the policies-seen memory):
    each run gets a fresh XDG state directory, inherited by every process it starts."""
    import tempfile

    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="escort-test-state-")
_lab_skipped: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("lab") is not None:
        _lab_skipped.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if REQUIRE_LAB and _lab_skipped:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"FAILED: {len(_lab_skipped)} lab test(s) skipped while ESCORT_REQUIRE_LAB=1: "
                + ", ".join(_lab_skipped[:5]),
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
