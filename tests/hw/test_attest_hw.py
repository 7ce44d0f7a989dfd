"""The attested launch against the real PSP (/dev/sev): the e2e workflow of tests/e2e/test_attest.py on sev-es.

The guest owner takes the platform's PDH and chain with `vmctl host --export-pdh` (SEV_PDH_CERT_EXPORT), checks
the chain up to the AMD root vmctl bundles (with the CEK AMD's KDS signed for this chip, from $VMMD_HW_CEK, when
the firmware's own is not signed), makes a session for it, vmmd launches the secret guest with attest = true on
platform sev-es, the owner verifies the measurement the firmware reported against the digest `vmctl measure`
predicts for this host's C-bit, builds the LAUNCH_SECRET packet, and the guest prints the SHA-256 of the secret
the firmware decrypted into its memory. A tampered header must fail in the firmware itself
(SEV_RET_BAD_MEASUREMENT or the status the firmware gives: any refusal, the guest still waiting). Skipped, with
`vmctl host`'s reason, where there is no SEV-ES.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vmmd.sev.host import host_report

_REPORT = host_report(memory_bytes=4 << 20)
CEK_ENV = "VMMD_HW_CEK"  # the ASK-signed CEK of this host's chip, fetched from AMD's KDS beforehand
pytestmark = pytest.mark.skipif(not _REPORT["sev_es_available"],
                                reason=f"SEV-ES hardware not available: {_REPORT['sev_es_reason']}")
REPO = Path(__file__).resolve().parents[2]
SECRET = b"a disk key for real hardware\n"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmd.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.timeout(240)
def test_attested_launch_on_the_real_psp() -> None:
    from tests.e2e.test_daemon import Daemon

    firmware = str(REPO / "firmware" / "build" / "secret.bin")
    root = Path(tempfile.mkdtemp(prefix="vmmd-attest-hw-"))
    daemon = Daemon(root)
    try:
        assert _cli("host", "--export-pdh", str(root / "pdh")).returncode == 0
        exported = os.listdir(root / "pdh")
        assert "cert_chain.cert" in exported and "ask_ark_simulated.cert" not in exported  # the firmware, not simpsp
        owner = root / "owner"
        # the chain checked up to the AMD roots bundled with vmctl (no --ca); the firmware's own CEK is not signed by
        # AMD, so the one AMD's KDS serves for this chip (https://kdsintf.amd.com/cek/id/<chip_id.txt>) is given
        chain = ["--chain", str(root / "pdh" / "sev_chain.cert")]
        bare = _cli("owner", "session", *chain, "--out", str(owner))
        if bare.returncode != 0:
            assert bare.returncode == 3 and "--cek" in bare.stderr, bare.stderr  # refused, saying what to pass
            if not os.environ.get(CEK_ENV):
                chip = (root / "pdh" / "chip_id.txt").read_text().strip()
                pytest.skip(f"the firmware's CEK is not signed by AMD: set {CEK_ENV} to the CEK AMD's KDS serves at "
                            f"https://kdsintf.amd.com/cek/id/{chip}")
            chain += ["--cek", os.environ[CEK_ENV]]
            made = _cli("owner", "session", *chain, "--out", str(owner))
            assert made.returncode == 0, made.stderr
        else:
            made = bare
        assert "certificate chain verified" in made.stdout and "AMD root bundled with vmmd" in made.stdout, made.stdout
        assert "warning" not in made.stderr
        (daemon.defs / "hw.toml").write_text(
            f'firmware = "{firmware}"\nmemory = "4M"\nplatform = "sev-es"\nattest = true\ntimeout = 120\n'
            f'dh_cert = "{owner / "vm_godh.b64"}"\nsession = "{owner / "vm_session.b64"}"\n')
        daemon.start()
        assert daemon.vmctl("start", "hw").returncode == 0
        assert daemon.wait_state("hw", ("running", "stopped", "failed"), 60)["state"] == "running"
        info = json.loads(daemon.vmctl("measurement", "hw", "--json").stdout)
        assert not info["simulated"] and info["state"] == "LSECRET"
        (root / "m.json").write_text(json.dumps(info))
        c_bit = str(_REPORT["cpu"]["leaf_8000001f"]["c_bit_position"])
        reported = daemon.request("show", name="hw")["guest"]["launch_digest"]
        predicted = [json.loads(_cli("measure", firmware, "--memory", "4M", "--c-bit", c_bit, init, "--json")
                                .stdout)["digest"] for init in ("--init2", "--legacy-init")]
        assert reported in predicted, (reported, predicted)
        verified = _cli("owner", "verify", "--measurement", str(root / "m.json"), "--tik",
                        str(owner / "vm_tik.bin"), "--digest", reported)
        assert verified.returncode == 0 and "match" in verified.stdout, verified.stdout + verified.stderr
        (root / "secret.txt").write_bytes(SECRET)
        built = _cli("owner", "secret", "--tek", str(owner / "vm_tek.bin"), "--tik", str(owner / "vm_tik.bin"),
                     "--measurement", str(root / "m.json"), "--secret", str(root / "secret.txt"), "--out",
                     str(root / "pkt"))
        assert built.returncode == 0, built.stderr
        header, payload = root / "pkt" / "vm_secret_header.bin", root / "pkt" / "vm_secret_payload.bin"
        tampered = root / "tampered.bin"
        raw = bytearray(header.read_bytes())
        raw[30] ^= 1
        tampered.write_bytes(bytes(raw))
        refused = daemon.vmctl("inject-secret", "hw", "--header", str(tampered), "--secret", str(payload))
        assert refused.returncode != 0 and "unharmed" in refused.stderr.decode(), refused.stderr
        assert daemon.vmctl("inject-secret", "hw", "--header", str(header), "--secret", str(payload)).returncode == 0
        assert daemon.vmctl("resume", "hw").returncode == 0
        shown = daemon.wait_state("hw", ("stopped", "failed"), 120)
        assert shown["end"]["exit_code"] == 0, shown
        assert f"sha256 {hashlib.sha256(SECRET).hexdigest()}" in daemon.vmctl("console", "hw").stdout.decode()
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.stop()
        shutil.rmtree(root, ignore_errors=True)
