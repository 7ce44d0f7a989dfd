"""A throwaway network namespace for tests that make taps and bridges (skipped without CAP_NET_ADMIN)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest

from vmmd.net.tap import net_admin_unavailable_reason


@contextlib.contextmanager
def scratch_netns(prefix: str) -> Iterator[str]:
    """A new named namespace, removed afterwards; the test is skipped where namespaces cannot be made."""
    reason = net_admin_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from pyroute2 import netns

    name = f"{prefix}-{os.getpid()}-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)
