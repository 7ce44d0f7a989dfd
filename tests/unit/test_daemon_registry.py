"""vmmd.daemon.registry: console ring, persistence across daemon restarts, honest ends."""

from __future__ import annotations

import json
from pathlib import Path

from vmmd.daemon.registry import ConsoleRing, Registry


def test_ring_keeps_the_tail_and_counts_everything():
    ring = ConsoleRing(8)
    ring.append(b"hello ")
    ring.append(b"world!")
    assert ring.contents() == b"o world!" and ring.total == 12
    ring.append(b"x" * 100)
    assert ring.contents() == b"x" * 8 and ring.total == 112


def _registry(tmp_path: Path) -> Registry:
    (tmp_path / "vms").mkdir(exist_ok=True)
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "log").mkdir(exist_ok=True)
    return Registry(tmp_path / "vms", tmp_path / "state", tmp_path / "log")


def test_persisted_states_and_lost_guests(tmp_path):
    reg = _registry(tmp_path)
    (tmp_path / "vms" / "a.toml").write_text('firmware = "/x.bin"\n')
    (tmp_path / "vms" / "b.toml").write_text('firmware = "/x.bin"\n')
    assert reg.load() == []
    a, b = reg.guests["a"], reg.guests["b"]
    a.state, a.end = "stopped", {"kind": "debug-exit", "reason": "r", "exit_code": 0}
    b.state, b.pid = "running", 4321
    reg.save()
    again = _registry(tmp_path)
    assert again.load() == []
    assert again.guests["a"].state == "stopped" and again.guests["a"].end["kind"] == "debug-exit"
    lost = again.guests["b"]
    assert lost.state == "stopped" and lost.end["kind"] == "killed"
    assert "vmmd exited while the guest was running (worker pid 4321)" in lost.end["reason"]
    assert "found at daemon restart" in again.read_log(lost, 10, 4096).decode()
    saved = json.loads((tmp_path / "state" / "guests.json").read_text())
    assert {g["name"]: g["state"] for g in saved["guests"]} == {"a": "stopped", "b": "stopped"}


def test_adhoc_guests_survive_and_removed_files_are_forgotten(tmp_path):
    from vmmd.daemon.definitions import parse_definition
    from vmmd.daemon.registry import Guest

    reg = _registry(tmp_path)
    (tmp_path / "vms" / "a.toml").write_text('firmware = "/x.bin"\n')
    reg.load()
    text = 'name = "mine"\nfirmware = "fw.bin"\n'
    reg.guests["mine"] = Guest(parse_definition(text, "/home/u/mine.toml", None, 1000, Path("/home/u")), adhoc=True)
    reg.save()
    (tmp_path / "vms" / "a.toml").unlink()
    again = _registry(tmp_path)
    again.load()
    assert list(again.guests) == ["mine"]
    mine = again.guests["mine"]
    assert mine.adhoc and mine.owner == 1000 and mine.definition.firmware == Path("/home/u/fw.bin")


def test_corrupt_state_file_is_reported_not_fatal(tmp_path):
    reg = _registry(tmp_path)
    (tmp_path / "state" / "guests.json").write_text("{not json")
    problems = reg.load()
    assert problems and "unreadable" in problems[0]


def test_the_log_of_a_running_guest_rotates_at_the_limit(tmp_path):
    from vmmd.daemon.registry import LOG_ROTATE_BYTES

    reg = _registry(tmp_path)
    (tmp_path / "vms" / "chatty.toml").write_text('firmware = "/x.bin"\n')
    reg.load()
    guest = reg.guests["chatty"]
    chunk = b"x" * 65536
    for _ in range(LOG_ROTATE_BYTES // len(chunk) + 8):  # a little over the limit, the log never reopened
        reg.log_console(guest, chunk)
    reg.log_event(guest, "still running")
    log, old = reg.log_path(guest), reg.log_path(guest).with_suffix(".log.1")
    assert old.stat().st_size > LOG_ROTATE_BYTES
    assert log.stat().st_size < LOG_ROTATE_BYTES and b"still running" in log.read_bytes()
    reg.close_log(guest)


def test_saved_adhoc_guests_that_no_longer_validate_are_kept_not_dropped(tmp_path):
    reg = _registry(tmp_path)
    bad = {"name": "old", "adhoc": True, "owner": 1000, "state": "stopped", "source": "/home/u/old.toml",
           "text": 'firmware = "/x.bin"\nmemory = "100000G"\n'}
    (tmp_path / "state" / "guests.json").write_text(json.dumps({"version": 1, "guests": [bad]}))
    problems = reg.load()
    assert any("no longer validates" in p and "unloadable" in p for p in problems), problems
    assert "old" not in reg.guests
    for _ in range(2):  # saved again and again, and read back, without losing it
        saved = json.loads((tmp_path / "state" / "guests.json").read_text())
        assert saved["unloadable"] == [bad]
        reg = _registry(tmp_path)
        reg.load()


def test_last_lines_counts_as_tail_n_does():
    from vmmd.daemon.registry import last_lines

    assert last_lines(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert last_lines(b"a\nb\nc", 2) == b"b\nc"  # a last line without a newline counts
    assert last_lines(b"a\nb\n", 5) == b"a\nb\n"
    assert last_lines(b"", 3) == b""
    assert last_lines(b"\n\n\n", 2) == b"\n\n"


def test_read_log_returns_whole_lines_from_far_back(tmp_path):
    reg = _registry(tmp_path)
    (tmp_path / "vms" / "a.toml").write_text('firmware = "/x.bin"\n')
    reg.load()
    guest = reg.guests["a"]
    lines = [f"line {i} ".encode() + b"x" * (i % 300) + b"\n" for i in range(3000)]  # ~450 KiB, chunks cut lines
    reg.log_path(guest).write_bytes(b"".join(lines))
    assert reg.read_log(guest, 100, 1 << 20) == b"".join(lines[-100:])
    assert reg.read_log(guest, 2999, 1 << 20) == b"".join(lines[1:])
    capped = reg.read_log(guest, 3000, 64 << 10)  # at most max_bytes: whole lines only, from the end
    assert len(capped) <= 64 << 10 and b"".join(lines).endswith(capped) and capped.startswith(b"line ")
