"""Guest networking: tap devices managed over rtnetlink (pyroute2), and attaching a virtio-net device to a machine.

`attach.attach_network(machine, spec)` is what Machine.build() calls for `--net`;
`tap.sweep_stale_taps(prefix)` is what the daemon calls at start.
"""
