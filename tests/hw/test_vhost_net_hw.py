"""virtio-net through the kernel's vhost-net (vmmd.net.vhost): the same UDP exchange the Python datapath passes
(tests/e2e/test_net.py), with vhost=on; skipped where the host has no /dev/vhost-net, with that reason."""

from __future__ import annotations

import pytest

from tests.e2e.test_net import check_exchange, netns_name  # noqa: F401 - the fixture
from vmmd.net.vhost import vhost_unavailable_reason

_REASON = vhost_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"vhost-net not available: {_REASON}")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("platform", ["plain", "sev-es-emu"])
def test_the_exchange_passes_through_vhost_net(netns_name, platform: str) -> None:  # noqa: F811
    proc = check_exchange(netns_name, platform, "tap,host-ip=10.0.2.2/24,vhost=on")
    assert "into vhost-net" in proc.stderr
