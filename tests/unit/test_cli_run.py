"""vmctl run's default guest name: valid for the daemon's rule without checking it at every start."""

from __future__ import annotations

from vmmd.cli.run import _valid_name, default_run_name
from vmmd.daemon.definitions import RESERVED_NAME_RE
from vmmd.daemon.protocol import NAME_RE


def test_default_run_name_is_a_valid_name_no_daemon_guest_may_take() -> None:
    name = default_run_name()
    assert NAME_RE.fullmatch(name) and RESERVED_NAME_RE.fullmatch(name)
    assert _valid_name(name) and _valid_name("a" * 63)
    assert not _valid_name("") and not _valid_name("-x") and not _valid_name("a" * 64) and not _valid_name("a/b")
