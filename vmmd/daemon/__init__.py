"""vmmd daemon: the control socket, the guest registry and one worker process per guest.

Modules: protocol (requests/responses and framing, shared with vmctl), auth (SO_PEERCRED policy),
definitions (TOML guest definitions), registry (guest states, console rings, logs, persisted state),
worker (the per-guest process and the warm pool), server (the asyncio daemon), sdnotify (systemd).
See docs/daemon.md.
"""
