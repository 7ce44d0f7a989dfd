"""Suite-wide rule: under `make test` (VMMD_STRICT_SKIPS=1, set by the Makefile for CI too) a test may skip
only when it is marked `hw`, i.e. when what it needs is hardware this host lacks (SEV-ES, /dev/vhost-net).
Any other skip means the set-up did not provide something it installs (a tool, an image, a package), which
would silently hide tests; it is reported as a failure naming the reason."""

from __future__ import annotations

import os

import pytest

STRICT = os.environ.get("VMMD_STRICT_SKIPS") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not STRICT or not report.skipped or item.get_closest_marker("hw") is not None:
        return
    if hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"skipped without being a hardware test (marked hw): {reason}\n"
                       "make test must run every test the set-up provides for: fix the set-up (the Makefile) or "
                       "mark the test hw if the host's hardware is what it lacks")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/hw/ is a hardware test."""
    for item in items:
        if "hw" in item.path.parent.parts[-1:]:
            item.add_marker(pytest.mark.hw)
