"""The guest owner's commands (vmctl owner), the attested launch's pieces and its definition keys, without KVM."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vmmd.cli import main
from vmmd.daemon.definitions import DefinitionError, parse_definition
from vmmd.memory import GuestMemory
from vmmd.sev import amdcert, amdroots, measure, owner, sevcert, sevchain, simpsp, vmsa
from vmmd.sev.attest import PausedLaunch, check_dh_cert, check_session, ovmf_secret_area
from vmmd.sev.launch import SevEsLaunch, SevModel


def _vmctl(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def _psp_dir(tmp_path_factory) -> Path:
    """One simulated PSP for the module: its RSA-4096 root and signing keys take a moment to make."""
    return tmp_path_factory.mktemp("psp")


@pytest.fixture
def platform(tmp_path: Path, _psp_dir: Path):
    """The simulated platform's keys and what vmctl host --export-pdh writes for it (pdh.cert, cert_chain.cert,
    sev_chain.cert, ask_ark_simulated.cert) in tmp_path."""
    psp = simpsp.load(_psp_dir)
    chain = psp.chain()
    pdh = tmp_path / "pdh.cert"
    pdh.write_bytes(chain.pdh)
    (tmp_path / "cert_chain.cert").write_bytes(chain.cert_chain)
    (tmp_path / "sev_chain.cert").write_bytes(chain.pdh + chain.cert_chain)
    (tmp_path / simpsp.ASK_ARK_FILE).write_bytes(chain.ask_ark)
    return psp, pdh


def _session(tmp_path: Path, out: str, *extra: str):
    """vmctl owner session for the simulated platform, its chain checked up to its simulated root (--ca)."""
    return _vmctl("owner", "session", "--chain", str(tmp_path / "sev_chain.cert"), "--ca",
                  str(tmp_path / simpsp.ASK_ARK_FILE), "--out", str(tmp_path / out), *extra)


def test_simulated_psp_keeps_its_keys_and_has_a_whole_chain(tmp_path: Path, _psp_dir: Path) -> None:
    first, second = simpsp.load(_psp_dir), simpsp.load(_psp_dir)
    assert first.pdh_key.private_numbers() == second.pdh_key.private_numbers()
    chain = first.chain()
    found = sevchain.parse(chain.pdh + chain.cert_chain + chain.ask_ark, "export")
    pdh, pek, oca, cek = (found.get(role) for role in ("PDH", "PEK", "OCA", "CEK"))
    assert pdh.usage == sevcert.Usage.PDH and pdh.curve == sevcert.Curve.P384
    assert [sig.usage for sig in pek.sigs] == [sevcert.Usage.OCA, sevcert.Usage.CEK]  # as a real PEK
    assert cek.sigs[0].usage == amdcert.Usage.ASK and cek.sigs[0].algo == sevcert.Algo.RSA_SHA384
    ask, ark = found.get("ASK"), found.get("ARK")
    assert ark.simulated and ask.simulated and "not AMD's" in ark.describe() and ark.modulus_bits == 4096
    assert second.ask_ark()[1].same_key(ark)  # the same root every time: an owner can pin it
    # the simulated root is no trust anchor unless given as one
    with pytest.raises(sevcert.CertError, match="is not one of the trusted AMD roots"):
        sevchain.verify_certificates(found)
    verified = sevchain.verify_certificates(found, (ask, ark), "the ARK from the test")
    assert verified.generation == "vmmd's simulated root" and not verified.anchor.bundled
    assert oct((_psp_dir / "ark.key").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(Exception, match="no pdh key yet"):
        simpsp.load(tmp_path / "elsewhere", create=False)


def test_session_files_are_sevctls_and_unwrap_on_the_platform(platform, tmp_path: Path) -> None:
    psp, pdh = platform
    result = _session(tmp_path, "o", "--policy", "NODBG")
    assert result.exit_code == 0, result.output
    assert "certificate chain verified" in result.output and "vmmd's simulated root" in result.output
    assert "protects nothing against that host" in result.output  # the warning, on stderr
    out = tmp_path / "o"
    assert sorted(p.name for p in out.iterdir()) == ["vm_godh.b64", "vm_session.b64", "vm_tek.bin", "vm_tik.bin"]
    godh = check_dh_cert((out / "vm_godh.b64").read_bytes(), "godh")
    session = check_session((out / "vm_session.b64").read_bytes(), "session")
    tek, tik = (out / "vm_tek.bin").read_bytes(), (out / "vm_tik.bin").read_bytes()
    assert len(tek) == len(tik) == 16 and oct((out / "vm_tik.bin").stat().st_mode & 0o777) == "0o600"
    z = owner.shared_secret(psp.pdh_key, sevcert.SevCert.decode(godh))
    assert owner.unwrap_session(z, owner.SessionBlob.decode(session), 0x5) == (tek, tik)  # NODBG + ES
    again = _session(tmp_path, "o")
    assert again.exit_code == 3 and "never replaces a file" in again.output
    assert (out / "vm_tik.bin").read_bytes() == tik


def test_session_needs_a_chain_that_verifies(platform, tmp_path: Path) -> None:
    psp, pdh = platform
    # no chain at all: refused, unless the owner says it takes the risk
    bare = _vmctl("owner", "session", "--pdh", str(pdh), "--out", str(tmp_path / "a"))
    assert bare.exit_code == 3 and "was given no chain: pass --chain" in bare.output and "--no-verify-chain" in \
        bare.output
    assert not (tmp_path / "a").exists()
    risky = _vmctl("owner", "session", "--pdh", str(pdh), "--no-verify-chain", "--out", str(tmp_path / "b"))
    assert risky.exit_code == 0 and "was not checked (--no-verify-chain)" in risky.output
    assert "read the secret" in risky.output
    # the PDH and cert_chain.cert (the firmware's layout) in two files, and --pek as the old name of --chain
    for option in ("--chain", "--pek"):
        ok = _vmctl("owner", "session", "--pdh", str(pdh), option, str(tmp_path / "cert_chain.cert"), "--ca",
                    str(tmp_path / simpsp.ASK_ARK_FILE), "--out", str(tmp_path / option.strip("-")))
        assert ok.exit_code == 0 and "certificate chain verified" in ok.output, ok.output
    # the simulated root is not trusted by default
    default = _vmctl("owner", "session", "--chain", str(tmp_path / "sev_chain.cert"), "--out", str(tmp_path / "c"))
    assert default.exit_code == 3 and "not signed by the ASK of any AMD generation bundled" in default.output
    assert "--cek" in default.output and "--ca" in default.output and not (tmp_path / "c").exists()
    # another platform's roots, PDH or chain: each link that breaks is named
    other = simpsp.load(tmp_path / "other-psp").chain()
    (tmp_path / "other_ask_ark.cert").write_bytes(other.ask_ark)
    (tmp_path / "other_pdh.cert").write_bytes(other.pdh)
    (tmp_path / "other_chain.cert").write_bytes(other.cert_chain)
    # a sevctl export --full style file whose ASK and ARK are the simulated ones: an ARK inside the chain is no anchor
    (tmp_path / "full.cert").write_bytes((tmp_path / "sev_chain.cert").read_bytes() +
                                         (tmp_path / simpsp.ASK_ARK_FILE).read_bytes())
    for args, text in (
        (["--chain", str(tmp_path / "sev_chain.cert"), "--ca", str(tmp_path / "other_ask_ark.cert")],
         "the CEK is not signed by the ASK"),
        (["--pdh", str(tmp_path / "other_pdh.cert"), "--chain", str(tmp_path / "cert_chain.cert"), "--ca",
          str(tmp_path / simpsp.ASK_ARK_FILE)], "the PDH is not signed by the PEK"),
        (["--pdh", str(tmp_path / "other_pdh.cert"), "--chain", str(tmp_path / "sev_chain.cert")],
         "hold two different PDH certificates"),
        (["--chain", str(tmp_path / "other_chain.cert"), "--pdh", str(pdh), "--ca",
          str(tmp_path / "other_ask_ark.cert")], "the PDH is not signed by the PEK"),
        (["--chain", str(tmp_path / "full.cert")], "the ARK (ARK R4096 R384 key id vmmd-sim-ark-"),
        (["--chain", str(tmp_path / "pdh.cert"), "--ca", str(tmp_path / simpsp.ASK_ARK_FILE)],
         "the chain lacks the PEK, OCA, CEK certificates"),
        (["--chain", str(tmp_path / "sev_chain.cert"), "--ca", str(tmp_path / "sev_chain.cert")],
         "is not an ask_ark file"),
    ):
        refused = _vmctl("owner", "session", *args, "--out", str(tmp_path / "d"))
        assert refused.exit_code == 3 and text in refused.output, (args, refused.output)
        assert "Traceback" not in refused.output and not (tmp_path / "d").exists()


def test_session_refuses_what_is_not_a_pdh(platform, tmp_path: Path) -> None:
    psp, _ = platform
    pek = tmp_path / "pek.cert"
    pek.write_bytes(psp.pek_cert())
    short = tmp_path / "short.cert"
    short.write_bytes(bytes(100))
    for path, text in ((pek, "not a PDH"), (short, "not valid base64"), (tmp_path / "missing", "cannot read")):
        result = _vmctl("owner", "session", "--pdh", str(path), "--out", str(tmp_path / "x"))
        assert result.exit_code == 3 and text in result.output, result.output


def test_session_for_real_amd_chains_with_the_bundled_roots(tmp_path: Path) -> None:
    """virtee/sev's Naples and Rome hardware certificates (tests/interop/test_sev_chain.py) through the CLI: the
    bundled roots, no --ca; a firmware-style CEK without AMD's signature is refused until the KDS one is given."""
    from tests.interop.test_sev_chain import _chain_bytes

    for generation, name in (("naples", "Naples"), ("rome", "Rome")):
        files = _chain_bytes(generation)
        pair = amdroots.by_generation(generation)
        full = tmp_path / f"{generation}_full.cert"  # sevctl export --full: PDH, PEK, OCA, CEK, ASK, ARK
        full.write_bytes(b"".join(files[r] for r in ("PDH", "PEK", "OCA", "CEK")) + pair.ask.encode() +
                         pair.ark.encode())
        ok = _vmctl("owner", "session", "--chain", str(full), "--out", str(tmp_path / generation))
        assert ok.exit_code == 0, ok.output
        ark_id = amdcert.key_id_text(pair.ark.key_id)
        assert "verified: PDH signed by PEK" in ok.output
        assert f": {name} (ARK key id {ark_id}, AMD root bundled with vmmd)" in ok.output
        assert "warning" not in ok.output
        # the firmware's own CEK: AMD's signature slot empty
        cek = sevcert.SevCert.decode(files["CEK"])
        unsigned = dataclasses.replace(cek, sigs=(sevcert.EMPTY_SIGNATURE, sevcert.EMPTY_SIGNATURE))
        fw_chain = tmp_path / f"{generation}_cert_chain.cert"
        fw_chain.write_bytes(files["PEK"] + files["OCA"] + unsigned.encode())
        (tmp_path / f"{generation}_pdh.cert").write_bytes(files["PDH"])
        (tmp_path / f"{generation}_cek.cert").write_bytes(files["CEK"])
        args = ["owner", "session", "--pdh", str(tmp_path / f"{generation}_pdh.cert"), "--chain", str(fw_chain)]
        refused = _vmctl(*args, "--out", str(tmp_path / "x"))
        assert refused.exit_code == 3 and "https://kdsintf.amd.com/cek/id/" in refused.output, refused.output
        assert "--cek" in refused.output and "chip_id.txt" in refused.output
        fetched = _vmctl(*args, "--cek", str(tmp_path / f"{generation}_cek.cert"), "--out",
                         str(tmp_path / f"{generation}-kds"))
        assert fetched.exit_code == 0 and f": {name} (ARK key id" in fetched.output, fetched.output
        # the same chain with a root that is not AMD's, offered as part of the chain (not --ca): refused
        rome = amdroots.by_generation("rome" if generation == "naples" else "naples")
        mixed = tmp_path / f"{generation}_mixed.cert"
        mixed.write_bytes(full.read_bytes()[:4 * sevcert.CERT_SIZE] + rome.ask.encode() + rome.ark.encode())
        wrong = _vmctl("owner", "session", "--chain", str(mixed), "--out", str(tmp_path / "y"))
        assert wrong.exit_code == 3 and "the CEK is not signed by the ASK" in wrong.output, wrong.output


def _measured(tmp_path: Path, platform) -> tuple:
    """A model launch with the owner's session, paused after LAUNCH_MEASURE, and its `vmctl measurement --json`."""
    psp, pdh = platform
    assert _session(tmp_path, "o").exit_code == 0
    out = tmp_path / "o"
    memory = GuestMemory.with_ram(4 << 20)
    memory.write(0x100000, bytes(range(256)) * 16)
    state = vmsa.x86_reset_state(0x00A00F11, cs_base=0, rip=0x100000)
    plan = measure.LaunchPlan(regions=(measure.MeasuredRegion(0x100000, memory.read(0x100000, 4096), "code"),),
                              vcpus=measure.build_vcpu_launches([state], init2=True, vmsa_features=0),
                              policy=0x5, init2=True, vmsa_features=0, cpu_sig=0x00A00F11)
    model = SevModel(memory, pdh_key=psp.pdh_key)
    launch = SevEsLaunch(model, plan, dh_cert=check_dh_cert((out / "vm_godh.b64").read_bytes(), "g"),
                         session=check_session((out / "vm_session.b64").read_bytes(), "s"))
    launch.run_to_measure(lambda p: None)
    paused = PausedLaunch(launch, simulated=True, secret_area=(0xA0000, 0x1000))
    info = paused.info()
    (tmp_path / "m.json").write_text(json.dumps(info))
    return out, info, measure.launch_digest(plan), tmp_path / "m.json", paused, memory


def test_verify_digest_forms_replay_and_wrong_tik(tmp_path: Path, platform) -> None:
    out, info, digest, mfile, _, memory = _measured(tmp_path, platform)
    tik = str(out / "vm_tik.bin")
    assert info["simulated"] and "proves nothing" in info["note"] and info["state"] == "LSECRET"
    first = _vmctl("owner", "verify", "--measurement", str(mfile), "--tik", tik, "--digest", digest.hex())
    assert first.exit_code == 0 and first.output.startswith("match:") and "proves nothing" in first.output
    again = _vmctl("owner", "verify", "--measurement", str(mfile), "--tik", tik,
                   "--digest", base64.b64encode(digest).decode())
    assert again.exit_code == 1 and "REFUSED" in again.output and "replayed" in again.output
    allowed = _vmctl("owner", "verify", "--measurement", str(mfile), "--tik", tik, "--digest", digest.hex(),
                     "--allow-replay", "--json")
    assert allowed.exit_code == 0 and json.loads(allowed.output)["ok"]
    (tmp_path / "zero.bin").write_bytes(bytes(16))
    wrong = _vmctl("owner", "verify", "--measurement", str(mfile), "--tik", str(tmp_path / "zero.bin"),
                   "--digest", digest.hex())
    assert wrong.exit_code == 1 and "MISMATCH" in wrong.output
    # the raw 48-byte blob needs the platform version given
    blob = base64.b64decode(info["measurement"])
    raw = _vmctl("owner", "verify", "--measurement", blob.hex(), "--tik", tik, "--digest", digest.hex(),
                 "--allow-replay")
    assert raw.exit_code == 3 and "--api-version" in raw.output
    both = _vmctl("owner", "verify", "--measurement", str(mfile), "--tik", tik)
    assert both.exit_code == 3 and "--digest" in both.output
    memory.close()


def test_secret_packet_opens_in_the_model_and_lands_in_the_secret_page(tmp_path: Path, platform) -> None:
    out, info, _, mfile, paused, memory = _measured(tmp_path, platform)
    (tmp_path / "key").write_bytes(b"s3cret")
    made = _vmctl("owner", "secret", "--tek", str(out / "vm_tek.bin"), "--tik", str(out / "vm_tik.bin"),
                  "--measurement", str(mfile), "--secret", str(tmp_path / "key"), "--out", str(tmp_path / "p"))
    assert made.exit_code == 0, made.output
    header = (tmp_path / "p" / "vm_secret_header.bin").read_bytes()
    payload = (tmp_path / "p" / "vm_secret_payload.bin").read_bytes()
    assert len(header) == 52 and len(payload) % 16 == 0
    with pytest.raises(Exception, match="larger than the secret area"):
        PausedLaunch(paused.launch, simulated=True, secret_area=(0xA0000, 16)).inject(header, payload, None)
    assert paused.inject(header, payload, None) == {"gpa": 0xA0000, "length": len(payload)}
    table = owner.parse_secret_table(memory.read(0xA0000, len(payload)))
    assert [data for _, data in table] == [b"s3cret"]
    assert paused.info()["secret_injected"]
    paused.resume()
    assert paused.info()["state"] == "RUNNING"
    with pytest.raises(Exception, match="resumed"):
        paused.inject(header, payload, None)
    with pytest.raises(Exception, match="already resumed"):
        paused.resume()
    big = tmp_path / "big"
    big.write_bytes(bytes(5000))
    refused = _vmctl("owner", "secret", "--tek", str(out / "vm_tek.bin"), "--tik", str(out / "vm_tik.bin"),
                     "--measurement", str(mfile), "--secret", str(big), "--out", str(tmp_path / "q"))
    assert refused.exit_code == 3 and "4 KiB page" in refused.output
    memory.close()


def test_no_secret_area_needs_a_gpa(tmp_path: Path, platform) -> None:
    _, _, _, _, paused, memory = _measured(tmp_path, platform)
    with pytest.raises(Exception, match="give the guest address with --gpa"):
        PausedLaunch(paused.launch, simulated=True, secret_area=None).inject(bytes(52), bytes(16), None)
    memory.close()


def test_ovmf_secret_block_from_the_footer_table() -> None:
    image = bytearray(Path("/usr/share/OVMF/OVMF_CODE_4M.fd").read_bytes())
    assert ovmf_secret_area(bytes(image)) is None  # Debian's generic build: base 0, size 0 (QEMU: give gpa=)
    guid = bytes.fromhex("61b32e4c9b7dc34c8081127c90d3d294")  # 4c2eb361-7d9b-4cc3-8081-127c90d3d294, EFI order
    at = bytes(image).rindex(guid)
    image[at - 10:at - 2] = (0x80_9000).to_bytes(4, "little") + (0xC00).to_bytes(4, "little")  # data, then u16 len
    assert ovmf_secret_area(bytes(image)) == (0x80_9000, 0xC00)


@pytest.mark.parametrize(("extra", "message"), [
    ('attest = "yes"', "key 'attest': must be true or false"),
    ('dh_cert = "g.b64"', "key 'session': dh_cert and session go together"),
    ('attest = true\nplatform = "plain"', "key 'attest': needs an SEV platform"),
    ("session = 5", "key 'session': must be a file path string"),
])
def test_definition_keys_are_checked(extra: str, message: str) -> None:
    text = 'firmware = "x.bin"\n' + extra + "\n"
    with pytest.raises(DefinitionError, match=message):
        parse_definition(text, "t.toml", "t", 0, Path("/defs"))


def test_definition_keys_resolve_relative_to_the_file() -> None:
    d = parse_definition('firmware = "x.bin"\nattest = true\ndh_cert = "o/vm_godh.b64"\nsession = "/abs/s.b64"\n',
                         "t.toml", "t", 0, Path("/defs"))
    assert d.attest and d.dh_cert == Path("/defs/o/vm_godh.b64") and d.session == Path("/abs/s.b64")
    assert d.summary()["attest"] is True


def test_bad_base64_and_sizes_are_named() -> None:
    with pytest.raises(Exception, match="not valid base64"):
        check_session(b"!!!", "s.b64")
    with pytest.raises(Exception, match="decodes to 3 bytes; a launch session is 128"):
        check_session(base64.b64encode(b"abc"), "s.b64")
    cert = bytearray(sevcert.generate()[0].encode())
    cert[0] = 7
    with pytest.raises(Exception, match="not an SEV certificate: SEV certificate version 7"):
        check_dh_cert(base64.b64encode(bytes(cert)), "g.b64")


def test_run_options_need_an_sev_platform(tmp_path: Path) -> None:
    from vmmd.cli.owner import apply_launch_options
    from vmmd.machine.platform import Platform

    with pytest.raises(Exception, match="platform plain has none"):
        apply_launch_options(Platform(), "0x5", None, None, False)
    with pytest.raises(Exception, match="needs the daemon"):
        apply_launch_options(Platform(), None, None, None, True)


def test_export_on_sev_hardware_writes_the_chain_and_the_chip_id(tmp_path: Path, monkeypatch) -> None:
    """vmctl host --export-pdh's hardware branch, with /dev/sev's two answers standing in (there is no PSP here):
    SEV_PDH_CERT_EXPORT as a Rome machine gave it (virtee/sev's vectors, its CEK without AMD's signature, as the
    firmware's is) and SEV_GET_ID2. The owner's session then needs the CEK AMD signed (--cek), and verifies with it."""
    from tests.interop.test_sev_chain import _chain_bytes
    from vmmd.cli.owner import export_pdh
    from vmmd.sev import psp as psp_module

    files = _chain_bytes("rome")
    cek = sevcert.SevCert.decode(files["CEK"])
    firmware_cek = dataclasses.replace(cek, sigs=(sevcert.EMPTY_SIGNATURE, sevcert.EMPTY_SIGNATURE)).encode()

    class FirmwareAnswers:
        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def pdh_cert_export(self) -> tuple[bytes, bytes]:
            return files["PDH"], files["PEK"] + files["OCA"] + firmware_cek

        def get_id2(self) -> bytes:
            return bytes(range(64))

    monkeypatch.setattr("vmmd.platforms.sev_es_unavailable_reason", lambda: None)
    monkeypatch.setattr(psp_module, "Psp", FirmwareAnswers)
    lines = export_pdh(tmp_path / "pdh")
    out = tmp_path / "pdh"
    assert sorted(p.name for p in out.iterdir()) == ["cert_chain.cert", "chip_id.txt", "pdh.cert", "sev_chain.cert"]
    assert (out / "chip_id.txt").read_text() == bytes(range(64)).hex().upper() + "\n"
    assert (out / "sev_chain.cert").read_bytes() == files["PDH"] + files["PEK"] + files["OCA"] + firmware_cek
    said = " ".join(lines)
    assert f"https://kdsintf.amd.com/cek/id/{bytes(range(64)).hex().upper()} " in said and "--cek" in said
    refused = _vmctl("owner", "session", "--chain", str(out / "sev_chain.cert"), "--out", str(tmp_path / "a"))
    assert refused.exit_code == 3 and "give the one AMD's KDS signed for this chip with --cek" in refused.output
    (tmp_path / "kds_cek.cert").write_bytes(files["CEK"])
    ok = _vmctl("owner", "session", "--chain", str(out / "sev_chain.cert"), "--cek", str(tmp_path / "kds_cek.cert"),
                "--out", str(tmp_path / "b"))
    assert ok.exit_code == 0 and ": Rome (ARK key id e6002122-fb58-4193-99d1-5fee7b131351" in ok.output, ok.output
    not_a_cek = _vmctl("owner", "session", "--chain", str(out / "sev_chain.cert"), "--cek", str(out / "pdh.cert"),
                       "--out", str(tmp_path / "c"))
    assert not_a_cek.exit_code == 3 and "is not one CEK certificate (it holds PDH)" in not_a_cek.output
