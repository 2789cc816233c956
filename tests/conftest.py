"""Suite-wide rules.

With ESCORT_REQUIRE_LAB=1 (set by ``./dev test`` as root, hence in CI) a lab test
that is skipped or not collected fails the run: lab tests never count as passing
without running.

``./dev test`` runs the suite on two pytest-xdist workers with ``--dist loadgroup``:
every lab test is put in one group (``xdist_group("lab")``), so all of them run in
order on ONE worker against ONE lab (the session fixture), while the other worker runs
the unit and UI tests meanwhile — the lab tests mostly wait (bandwidth caps, daemons,
timeouts), so the two overlap. The skipped-lab-test rule is checked on the controller
from the reports the workers send (``pytest_runtest_logreport``), so it holds with or
without xdist.
"""

from __future__ import annotations

import os

import pytest

REQUIRE_LAB = os.environ.get("ESCORT_REQUIRE_LAB") == "1"
LAB_GROUP = "lab"
_LAB_PROPERTY = "escort_lab_test"


def pytest_configure(config: pytest.Config) -> None:
    """Tests never read or write the user's own escort state (the policies-seen memory) or
    cache: each run gets a fresh XDG state directory and cache directory, inherited by
    every process it starts (a test may set its own)."""
    import tempfile

    os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="escort-test-state-")
    os.environ.setdefault("ESCORT_CACHE_DIR", tempfile.mkdtemp(prefix="escort-test-cache-"))


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """All lab tests share one lab: with xdist they must all run on the same worker."""
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(pytest.mark.xdist_group(LAB_GROUP))


_lab_skipped: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if item.get_closest_marker("lab") is not None:
        # travels with the report from an xdist worker to the controller
        report.user_properties.append((_LAB_PROPERTY, True))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and any(name == _LAB_PROPERTY for name, _ in report.user_properties):
        _lab_skipped.append(report.nodeid)


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
