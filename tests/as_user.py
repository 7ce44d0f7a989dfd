"""Run a function in a forked child with other credentials: real peer credentials and permissions in tests."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def run_as_user(uid: int, groups: list[int], fn: Callable[[], dict]) -> dict:
    """fn() in a forked child that dropped to `uid` (primary gid: groups[0], else uid) with these supplementary
    groups; returns what it returned (a JSON-able dict), or {"exception": "Type: message"} if it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into the test runner
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(groups[0] if groups else uid)
            os.setuid(uid)
            result = fn()
        except BaseException as err:  # noqa: BLE001 - carried to the parent
            result = {"exception": f"{type(err).__name__}: {err}"}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    data = b""
    while chunk := os.read(read_end, 65536):
        data += chunk
    os.close(read_end)
    os.waitpid(pid, 0)
    return json.loads(data)
