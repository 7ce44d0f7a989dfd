"""Launch digest, measurement HMAC, OVMF footer parsing, CPU signatures and the measure/verify CLI.

Expected values here are assembled independently (struct.pack + hmac, hashlib over
concatenated bytes, hand-built footer tables), never by calling the code under test
for the layout it is being tested on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from vmmd.cli.measure import measure_cmd, verify_cmd
from vmmd.errors import VmmdError
from vmmd.sev import cpu_types, measure, ovmf
from vmmd.sev.vmsa import VMSA_PAGE_SIZE

FOOTER = uuid.UUID("96b582de-1fb2-45f7-baea-a366c55a082d")
RESET_BLOCK = uuid.UUID("00f771de-1a7e-4fcb-890e-68c77e2fb44e")


def _entry(guid: uuid.UUID, data: bytes) -> bytes:
    return data + struct.pack("<H", len(data) + 18) + guid.bytes_le


def make_image(size: int = 64 * 1024, reset_eip: int | None = 0x80B004, extra: bytes = b"") -> bytes:
    """A fake reset-vector image: random body, footer table 48 bytes before the end, 32 bytes of tail."""
    rng = random.Random(size ^ (reset_eip or 0))
    entries = extra
    if reset_eip is not None:
        entries += _entry(RESET_BLOCK, struct.pack("<I", reset_eip) + b"\0" * 4)
    table = entries + struct.pack("<H", len(entries) + 18) + FOOTER.bytes_le
    tail = bytes(rng.getrandbits(8) for _ in range(32))
    body = bytes(rng.getrandbits(8) for _ in range(size - len(table) - len(tail)))
    return body + table + tail


# --- measurement HMAC -------------------------------------------------------------------------

def test_expected_measurement_known_answer() -> None:
    rng = random.Random(5)
    tik, digest, mnonce = (bytes(rng.getrandbits(8) for _ in range(n)) for n in (16, 32, 16))
    api_major, api_minor, build, policy = 0, 24, 15, 0x00050005
    message = struct.pack("<BBBBI", 0x04, api_major, api_minor, build, policy) + digest + mnonce
    want = hmac.new(tik, message, hashlib.sha256).digest()
    assert measure.expected_measurement(digest, tik, api_major, api_minor, build, policy, mnonce) == want


@pytest.mark.parametrize("index", range(7))
def test_every_input_changes_the_measurement(index: int) -> None:
    args = [bytes(32), bytes(16), 1, 2, 3, 5, bytes(16)]
    base = measure.expected_measurement(*args)
    changed = list(args)
    changed[index] = (b"\1" + args[index][1:]) if isinstance(args[index], bytes) else args[index] + 1
    assert measure.expected_measurement(*changed) != base


@pytest.mark.parametrize("bad", [{"digest": bytes(31)}, {"tik": bytes(15)}, {"mnonce": bytes(17)},
                                 {"api_major": 256}, {"build": -1}, {"policy": 1 << 32}])
def test_expected_measurement_rejects_bad_inputs(bad: dict) -> None:
    args = {"digest": bytes(32), "tik": bytes(16), "api_major": 0, "api_minor": 0, "build": 0, "policy": 0,
            "mnonce": bytes(16)}
    args.update(bad)
    with pytest.raises(ValueError):
        measure.expected_measurement(**args)


def test_verify_match_and_mismatch() -> None:
    tik, digest, mnonce = b"T" * 16, hashlib.sha256(b"x").digest(), b"N" * 16
    message = struct.pack("<BBBBI", 4, 0, 17, 48, 5) + digest + mnonce
    blob = hmac.new(tik, message, hashlib.sha256).digest() + mnonce
    ok = measure.verify(blob, tik, digest=digest, api_major=0, api_minor=17, build=48, policy=5)
    assert ok.match and ok.mnonce == mnonce and ok.assumed["api_version"] == "0.17"
    bad = measure.verify(blob, tik, digest=digest, api_major=0, api_minor=17, build=49, policy=5,
                         assumed={"vcpus": 2})
    assert not bad.match and bad.assumed["build"] == 49 and bad.assumed["vcpus"] == 2
    with pytest.raises(ValueError):
        measure.verify(blob[:47], tik, digest=digest, api_major=0, api_minor=17, build=48, policy=5)


# --- launch plan and digest ----------------------------------------------------------------------

def test_launch_digest_is_sha256_of_regions_then_vmsas() -> None:
    image = make_image()
    plan = measure.build_ovmf_plan(image, 3, "EPYC-Milan")
    vmsas = [v.vmsa for v in plan.vcpus]
    assert len(vmsas) == 3 and all(len(v) == VMSA_PAGE_SIZE for v in vmsas)
    assert measure.launch_digest(plan) == hashlib.sha256(image + b"".join(vmsas)).digest()
    assert vmsas[1] == vmsas[2] != vmsas[0]


def test_region_order_matters_and_numpy_views_are_hashed_in_place() -> None:
    mem = np.zeros(8192, dtype=np.uint8)
    a = measure.MeasuredRegion(gpa=0, data=mem[:4096], name="a")
    b = measure.MeasuredRegion(gpa=0x1000, data=mem[4096:], name="b")
    mem[5] = 1
    plan_ab = measure.LaunchPlan(regions=(a, b), vcpus=(), policy=1, init2=True, vmsa_features=0, cpu_sig=0)
    plan_ba = measure.LaunchPlan(regions=(b, a), vcpus=(), policy=1, init2=True, vmsa_features=0, cpu_sig=0)
    assert measure.launch_digest(plan_ab) == hashlib.sha256(mem.tobytes()).digest()
    assert measure.launch_digest(plan_ab) != measure.launch_digest(plan_ba)
    mem[4100] = 7  # the plan holds views, not copies
    assert measure.launch_digest(plan_ab) == hashlib.sha256(mem.tobytes()).digest()


def test_plan_validation() -> None:
    with pytest.raises(ValueError):
        measure.MeasuredRegion(gpa=8, data=bytes(16), name="misaligned")
    with pytest.raises(ValueError):
        measure.MeasuredRegion(gpa=0, data=bytes(20), name="odd length")
    plan = measure.build_ovmf_plan(make_image(), 2, "EPYC")
    with pytest.raises(ValueError, match="ES bit"):
        measure.LaunchPlan(regions=plan.regions, vcpus=plan.vcpus, policy=1, init2=True, vmsa_features=0,
                           cpu_sig=plan.cpu_sig)
    with pytest.raises(ValueError, match="index order"):
        measure.LaunchPlan(regions=plan.regions, vcpus=plan.vcpus[::-1], policy=5, init2=True, vmsa_features=0,
                           cpu_sig=plan.cpu_sig)


def test_ovmf_plan_places_image_below_4gib_and_starts_aps_at_reset_block() -> None:
    image = make_image(size=128 * 1024, reset_eip=0x80B004)
    plan = measure.build_ovmf_plan(image, 2, 0x800F12, init2=False)
    assert plan.regions[0].gpa == (1 << 32) - 128 * 1024
    bsp, ap = plan.vcpus[0].state, plan.vcpus[1].state
    assert (bsp.cs.selector, bsp.cs.base, bsp.rip, bsp.rdx) == (0xF000, 0xFFFF0000, 0xFFF0, 0x800F12)
    assert (ap.cs.selector, ap.cs.base, ap.rip) == (0xF000, 0x800000, 0xB004)
    assert plan.vcpus[1].vmsa[0x400:] == bytes(VMSA_PAGE_SIZE - 0x400)  # legacy init: no FPU area


def test_ovmf_plan_needs_the_reset_block() -> None:
    with pytest.raises(VmmdError, match="reset block"):
        measure.build_ovmf_plan(make_image(reset_eip=None), 1, "EPYC")
    with pytest.raises(VmmdError, match="zero"):
        measure.build_ovmf_plan(make_image(reset_eip=0), 1, "EPYC")


# --- OVMF footer table ---------------------------------------------------------------------------

def test_footer_table_entries() -> None:
    other = uuid.UUID("7255371f-3a3b-4b04-927b-1da6efa8d454")
    image = make_image(extra=_entry(other, b"\x00\x0c\x80\x00" + b"\x00" * 4))
    table = ovmf.parse_footer_table(image)
    assert table[RESET_BLOCK][:4] == struct.pack("<I", 0x80B004)
    assert table[other] == b"\x00\x0c\x80\x00" + b"\x00" * 4
    img = ovmf.OvmfImage.from_bytes(image)
    assert img.sev_es_reset_eip() == 0x80B004 and img.sev_hash_table_gpa() == 0x800C00


def test_no_footer_means_empty_table() -> None:
    assert ovmf.parse_footer_table(bytes(8192)) == {}


@pytest.mark.parametrize("corrupt", ["entry_too_long", "entry_too_short", "table_too_long"])
def test_malformed_footer_table_raises(corrupt: str) -> None:
    image = bytearray(make_image())
    footer_len_at = len(image) - 48 - 2
    entry_len_at = footer_len_at - 18
    if corrupt == "entry_too_long":
        struct.pack_into("<H", image, entry_len_at, 0x4000)
    elif corrupt == "entry_too_short":
        struct.pack_into("<H", image, entry_len_at, 3)
    else:
        struct.pack_into("<H", image, footer_len_at, 0xFFFF)
        image = image[-0x1000:]
    with pytest.raises(VmmdError):
        ovmf.parse_footer_table(bytes(image))


def test_image_size_checks() -> None:
    with pytest.raises(VmmdError):
        ovmf.OvmfImage.from_bytes(bytes(4097))
    with pytest.raises(VmmdError):
        ovmf.OvmfImage.from_bytes(b"")


# --- CPU signatures ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,sig", [("EPYC", 0x00800F12), ("EPYC-v4", 0x00800F12), ("EPYC-Rome", 0x00830F10),
                                      ("EPYC-Milan", 0x00A00F11), ("EPYC-Genoa", 0x00A10F10)])
def test_cpu_signatures(name: str, sig: int) -> None:
    assert cpu_types.resolve_cpu_sig(name) == sig
    assert cpu_types.resolve_cpu_sig(name.lower()) == sig
    assert cpu_types.cpu_sig(*cpu_types.decode_sig(sig)) == sig


def test_cpu_sig_numbers_and_errors() -> None:
    assert cpu_types.resolve_cpu_sig("0x800f12") == 0x800F12
    assert cpu_types.resolve_cpu_sig(0x600) == 0x600
    with pytest.raises(VmmdError):
        cpu_types.resolve_cpu_sig("Pentium")
    with pytest.raises(VmmdError):
        cpu_types.resolve_cpu_sig(1 << 32)


# --- CLI -----------------------------------------------------------------------------------------

@pytest.fixture
def fw(tmp_path: Path) -> Path:
    path = tmp_path / "fw.fd"
    path.write_bytes(make_image())
    return path


def test_measure_cli_digest_and_dump(fw: Path, tmp_path: Path) -> None:
    out = tmp_path / "vmsa"
    res = CliRunner().invoke(measure_cmd, [str(fw), "--vcpus", "2", "--cpu-type", "EPYC-Genoa", "--json",
                                           "--dump-vmsa", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    dumped = [(out / f"vmsa{i}.bin").read_bytes() for i in range(2)]
    assert data["digest"] == hashlib.sha256(fw.read_bytes() + b"".join(dumped)).hexdigest()
    assert data["assumed"]["cpu_sig"] == "0xa10f10"


def test_measure_then_verify_cli(fw: Path, tmp_path: Path) -> None:
    tik = tmp_path / "tik.bin"
    tik.write_bytes(bytes(range(16)))
    nonce = "00112233445566778899aabbccddeeff"
    args = [str(fw), "--vcpus", "2", "--policy", "0x5"]
    res = CliRunner().invoke(measure_cmd, args + ["--tik", str(tik), "--api-version", "0.24", "--build", "15",
                                                  "--mnonce", nonce, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    message = struct.pack("<BBBBI", 4, 0, 24, 15, 5) + bytes.fromhex(data["digest"]) + bytes.fromhex(nonce)
    assert data["measurement"] == hmac.new(bytes(range(16)), message, hashlib.sha256).hexdigest()
    blob = data["measurement"] + nonce
    good = CliRunner().invoke(verify_cmd, args + ["--measurement", blob, "--tik", str(tik), "--api-version", "0.24",
                                                  "--build", "15"])
    assert good.exit_code == 0 and "match" in good.output
    bad = CliRunner().invoke(verify_cmd, args + ["--measurement", blob, "--tik", str(tik), "--api-version", "0.24",
                                                 "--build", "16"])
    assert bad.exit_code == 1 and "MISMATCH" in bad.output and re.search(r"build: +16\n", bad.output)


def test_cli_host_error_exit_code(tmp_path: Path) -> None:
    res = CliRunner().invoke(measure_cmd, [str(tmp_path / "missing.fd")])
    assert res.exit_code == 3 and "missing.fd does not exist" in res.output


def test_cli_measures_a_guest_definition_with_its_own_memory_vcpus_and_guest_arg(tmp_path: Path) -> None:
    """`vmctl measure guest.toml` measures what the definition launches; options given on the command line
    still win. The digests are checked against flat_image_digest() with the same inputs."""
    from vmmd.sev.platform import LaunchInputs, flat_image_digest

    hello = Path(__file__).resolve().parents[2] / "firmware" / "build" / "hello.bin"
    definition = tmp_path / "guest.toml"
    definition.write_text(f'firmware = "{hello}"\nmemory = "32M"\nvcpus = 2\nguest_arg = 7\n')
    res = CliRunner().invoke(measure_cmd, [str(definition), "--json"])
    assert res.exit_code == 0, res.output
    want, _ = flat_image_digest(hello, 32 << 20, 2, LaunchInputs(), guest_arg=7)
    assert json.loads(res.output)["digest"] == want.hex()
    res = CliRunner().invoke(measure_cmd, [str(definition), "--json", "--vcpus", "1"])
    want, _ = flat_image_digest(hello, 32 << 20, 1, LaunchInputs(), guest_arg=7)
    assert json.loads(res.output)["digest"] == want.hex()
    assert json.loads(res.output)["assumed"]["cpu_type"] is None  # a flat image has no CPUID signature


@pytest.mark.parametrize("args, message", [
    (["--cpu-type", "bogus"], "unknown vCPU type"),
    (["--vmsa-features", "-5"], "--vmsa-features must be between"),
    (["--policy", hex(1 << 32)], "--policy must be between"),
    (["--tik", "TIK", "--api-version", "999.1", "--build", "1", "--mnonce", "00" * 16], "are bytes"),
])
def test_cli_refuses_out_of_range_inputs_as_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    hello = Path(__file__).resolve().parents[2] / "firmware" / "build" / "hello.bin"
    tik = tmp_path / "tik"
    tik.write_bytes(bytes(16))
    res = CliRunner().invoke(measure_cmd, [str(hello), *[str(tik) if a == "TIK" else a for a in args]])
    assert res.exit_code in (2, 3) and message in res.output, res.output
    assert not isinstance(res.exception, (ValueError, OverflowError)), res.exception


def test_cli_refuses_a_device_without_reading_it() -> None:
    res = CliRunner().invoke(measure_cmd, ["/dev/zero"])
    assert res.exit_code == 3 and "not a regular file" in res.output


def test_human_measure_output_has_no_python_reprs() -> None:
    flat = Path(__file__).resolve().parents[2] / "firmware" / "build" / "hello.bin"
    out = CliRunner().invoke(measure_cmd, [str(flat), "--vcpus", "2"]).output
    assert "None" not in out and "{" not in out and "[" not in out, out
    assert re.search(r"policy: +0x5 \(NODBG, ES\)", out) and "2 VMSA page(s)" in out
    assert re.search(r"0x100000 +\d+ bytes  firmware hello.bin", out), out
