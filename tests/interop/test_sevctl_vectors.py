"""The guest-owner protocol (vmmd/sev/owner.py, sevcert.py) against virtee/sev's and virtee/sevctl's own test vectors.

Every expected value below is transcribed from those projects' tests (Apache-2.0), with the place it
comes from; no file of theirs is copied. Where their test reads a small data file, the file's bytes
are transcribed as hex (16-byte keys) or described exactly (a run of '.' characters); where it reads a
4 KiB binary (their trimmed OVMF image and VMSA pages) only the SHA-256 launch digest of the inputs, as
their measurement code forms it, is transcribed.
"""

from __future__ import annotations

import base64
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from vmmd.sev import owner, sevcert
from vmmd.sev.measure import expected_measurement, verify

ZERO16 = bytes(16)


# --- virtee/sev src/session/key.rs tests -----------------------------------------------------------
def test_kdf_matches_virtee_sev_key_derive() -> None:
    # key.rs `fn derive()`: Key::zeroed(16).derive(16, &[0u8; 16], "sev-master-secret")
    assert owner.kdf(ZERO16, 16, ZERO16, "sev-master-secret") == bytes.fromhex("ab4d269fcc62bedb4511d56c386ce706")


def test_mac_matches_virtee_sev_key_mac() -> None:
    # key.rs `fn mac()`: Key::zeroed(16).mac(&[0u8; 4])
    assert owner.hmac_sha256(ZERO16, bytes(4)) == bytes.fromhex(
        "aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")


# --- virtee/sev src/session/mod.rs `mod initialized` tests ------------------------------------------
def test_session_blob_matches_virtee_sev_session() -> None:
    # `fn session()`: policy default (0), TEK = TIK = 0, session([0; 16] nonce, [0; 16] iv, Key::zeroed(16) Z)
    blob = owner.wrap_session(ZERO16, ZERO16, ZERO16, ZERO16, ZERO16, 0)
    assert blob.wrap_iv == ZERO16 and blob.nonce == ZERO16
    assert blob.wrap_tk == bytes.fromhex("2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4")
    assert blob.wrap_mac == bytes.fromhex("3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d")
    assert blob.policy_mac == bytes.fromhex("aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")
    # the byte layout of launch::sev::Session (repr(C)): nonce, wrap_tk, wrap_iv, wrap_mac, policy_mac
    raw = blob.encode()
    assert len(raw) == owner.SESSION_SIZE == 128
    assert raw[16:48] == blob.wrap_tk and raw[64:96] == blob.wrap_mac and raw[96:] == blob.policy_mac
    assert owner.SessionBlob.decode(raw) == blob
    # and the platform's side of the same exchange gets the keys back
    assert owner.unwrap_session(ZERO16, blob, 0) == (ZERO16, ZERO16)


def test_measurement_matches_virtee_sev_verify() -> None:
    # `fn verify()`: digest = SHA-256(""), API 0.18 (0x12) build 15, policy default (0), TIK as below
    digest = bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    measure = bytes.fromhex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea")
    mnonce = bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554")
    tik = bytes.fromhex("66320db73158a35a255d051758e95ed4")
    assert expected_measurement(digest, tik, 0x00, 0x12, 0x0F, 0, mnonce) == measure
    assert verify(measure + mnonce, tik, digest=digest, api_major=0, api_minor=0x12, build=0x0F, policy=0).match
    wrong = bytes([tik[0] ^ 1]) + tik[1:]
    assert not verify(measure + mnonce, wrong, digest=digest, api_major=0, api_minor=0x12, build=0x0F,
                      policy=0).match


# --- virtee/sevctl tests/measurementbuild.rs -------------------------------------------------------
SEVCTL_MEASURE_TIK = bytes.fromhex("3569cf61a32a602b87185ac6e0f55913")  # tests/data/measurement/tik1.bin
SEVCTL_NONCE = base64.b64decode("wxP6tRHCFrFQWxsuqZA8QA==")


def _sevctl_measurement(digest: bytes, api: tuple[int, int], build: int, policy: int, nonce: bytes) -> str:
    return base64.b64encode(expected_measurement(digest, SEVCTL_MEASURE_TIK, *api, build, policy, nonce)
                            + nonce).decode()


def test_measurement_build_with_launch_digest() -> None:
    # args1: --api-major 0x01 --api-minor 40 --build-id 40 --policy 0x03 --launch-digest xkvR...
    digest = base64.b64decode("xkvRAfyaSizgonxAjZIAkR8TmolUabBKQKb6KJCDDSM=")
    assert _sevctl_measurement(digest, (1, 40), 40, 0x03, SEVCTL_NONCE) == \
        "lswbxWxI9gckya16JQvdFtpYmNO4b+3inAPpqsgoBI7DE/q1EcIWsVBbGy6pkDxA"


def test_measurement_build_with_firmware() -> None:
    # args_firmware: --firmware tests/data/OVMF.amdsev.fd_trimmed_... (4096 bytes); the digest sevctl forms,
    # SHA-256 of that file, is 2f6fc606...: transcribed here, the image is not copied
    digest = bytes.fromhex("2f6fc6065f4abc131eb4fb2b5090a542636eae84a94c0db0fdd5f405cb372ff5")
    assert _sevctl_measurement(digest, (1, 40), 40, 0x03, SEVCTL_NONCE) == \
        "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA"


def test_measurement_build_sev_es_vmsas() -> None:
    # args_vmsa: policy 0x05 (SEV-ES), API 1.49 build 6, 4 vCPUs: digest = SHA-256(firmware ‖ vmsa0 ‖ vmsa1 x 3)
    # (measurement.rs build_cpu_state()), transcribed as 847b5ab6...; the nonce comes from the expected blob
    expected = "/o0nzDKE5XgtVnUZWPhUea/WZYrTKLExR7KCwuMdbActvpWfXTFk21KMZIAAhQny"
    digest = bytes.fromhex("847b5ab6db136ea67dc5a95478ebe7e5ebbe93e9e74bdb1284165f9007a4e367")
    _, nonce = owner.split_measurement(base64.b64decode(expected))
    assert _sevctl_measurement(digest, (1, 49), 6, 0x05, nonce) == expected


# --- virtee/sevctl tests/secretbuild.rs ------------------------------------------------------------
SEVCTL_SECRET_TIK = bytes.fromhex("c6d5a9956133050912b24bbe5c372686")  # tests/data/secret/tik1.bin
SEVCTL_SECRET_TEK = bytes.fromhex("52a869b79ab9c13bb6a92b0561619cb3")  # tests/data/secret/tek1.bin
SEVCTL_SECRET_MEASURE_BLOB = "TLeA7607lZQntLjRY1/i+sbtdSZ+75zxpz4Px9hzpBLwItF5Q2o4prA++3ZZv9ZS"
SEVCTL_IV = base64.b64decode("rFR07U3TLH2YnsUj2SVZ7A==")
SECRET1 = (uuid.UUID("736869e5-84f0-4973-92ec-06879ce3da0b"), b"MY-LUKS-PASSPHRASE")  # secret1.txt (18 bytes)
SECRET2 = (uuid.UUID("736869e5-aaaa-4973-92ec-06879ce3da0b"), b"SOME OTHER SECRET")  # secret2.txt (17 bytes)


def _sevctl_secret(secrets: list[tuple[uuid.UUID, bytes]], iv: bytes | None = SEVCTL_IV) -> tuple[bytes, bytes]:
    measure, _ = owner.split_measurement(base64.b64decode(SEVCTL_SECRET_MEASURE_BLOB))
    table = owner.build_secret_table(secrets)
    return owner.build_secret(SEVCTL_SECRET_TEK, SEVCTL_SECRET_TIK, measure, table, iv=iv)


@pytest.mark.parametrize(("secrets", "header", "payload"), [
    ([SECRET1], "AAAAAKxUdO1N0yx9mJ7FI9klWey8FSzeYQ4X8K71VzNKLU/KQsIsQxLjtbhaPUewqshX5Q==",
     "0U3e5PcXv0UW+H4tSBFKOdCYfKE1+j38Bc2fuO16mYiyI+sWx7INfn+lgYj56GL12yyinDa+lVfCCwD/2w5cPA=="),
    ([SECRET1, SECRET2], "AAAAAKxUdO1N0yx9mJ7FI9klWeyZ3r0dOEKHUOhIRqzGYYvTJgdMtBPL1nK6GD9aGET7Ng==",
     "0U3e5PcXv0UW+H4tSBFKObWYfKE1+j38Bc2fuO16mYiyI+sWx7INfn+lgYj56GL12yyinDa+lVfCC+WWs332lpLNUX1ZI3YK7vYgtys4X+uG"
     "xEIlkIQ90v8/w8ZFmQMe"),
], ids=["one-secret", "two-secrets"])
def test_secret_build_exact_bytes(secrets, header: str, payload: str) -> None:
    got_header, got_payload = _sevctl_secret(secrets)
    assert base64.b64encode(got_header).decode() == header
    assert base64.b64encode(got_payload).decode() == payload
    # and the platform's side opens it again, to the same table
    measure, _ = owner.split_measurement(base64.b64decode(SEVCTL_SECRET_MEASURE_BLOB))
    table = owner.open_secret(SEVCTL_SECRET_TEK, SEVCTL_SECRET_TIK, measure, got_header, got_payload,
                              len(got_payload))
    assert owner.parse_secret_table(table) == secrets


def test_secret_build_random_iv_differs() -> None:
    assert _sevctl_secret([SECRET1], iv=None) != _sevctl_secret([SECRET1], iv=None)


def test_secret_build_padding_at_the_largest_secret() -> None:
    # secret3.txt is 16343 and secret4.txt 16344 bytes (both '.'); sevctl asserts both payloads are 16384 bytes
    guid = uuid.UUID("23058844-597b-42fb-8259-a0f5d9d495af")
    _, p1 = _sevctl_secret([(guid, b"." * 16343)])
    _, p2 = _sevctl_secret([(guid, b"." * 16344)])
    assert len(p1) == len(p2) == 16384


# --- certificate format (virtee/sev certs/sev; SEV API appendix) --------------------------------------
def test_godh_certificate_layout() -> None:
    cert, private = sevcert.generate(sevcert.Usage.PDH)
    raw = cert.encode()
    assert len(raw) == sevcert.CERT_SIZE == 0x824
    assert raw[0:4] == (1).to_bytes(4, "little")  # version
    assert raw[8:12] == (0x1003).to_bytes(4, "little")  # usage PDH
    assert raw[12:16] == (3).to_bytes(4, "little")  # ECDH_SHA256
    assert raw[16:20] == (2).to_bytes(4, "little")  # P-384
    numbers = private.public_key().public_numbers()
    assert raw[0x14:0x14 + 48] == numbers.x.to_bytes(48, "little") and raw[0x14 + 48:0x14 + 72] == bytes(24)
    assert raw[0x5C:0x5C + 48] == numbers.y.to_bytes(48, "little")
    assert raw[0x414:0x41C] == (0x1000).to_bytes(4, "little") + bytes(4)  # empty signature slots (usage INV)
    assert raw[0x61C:0x624] == (0x1000).to_bytes(4, "little") + bytes(4)
    assert sevcert.SevCert.decode(raw) == cert


def test_signed_pdh_verifies_and_refuses_others() -> None:
    pek, pek_key = sevcert.generate(sevcert.Usage.PEK)
    pdh, _ = sevcert.generate(sevcert.Usage.PDH)
    signed = sevcert.sign(pdh, pek_key, sevcert.Usage.PEK)
    sevcert.verify_signed_by(sevcert.SevCert.decode(signed.encode()), pek)
    other, _ = sevcert.generate(sevcert.Usage.PEK)
    with pytest.raises(sevcert.CertError, match="no valid signature"):
        sevcert.verify_signed_by(signed, other)


@pytest.mark.parametrize(("offset", "value", "match"), [
    (0, 2, "version 2"), (12, 9, "algorithm"), (16, 7, "curve"), (0x14, 12345, "not a point"),
])
def test_bad_certificates_are_refused(offset: int, value: int, match: str) -> None:
    raw = bytearray(sevcert.generate()[0].encode())
    raw[offset:offset + 4] = value.to_bytes(4, "little")
    with pytest.raises(sevcert.CertError, match=match):
        sevcert.SevCert.decode(bytes(raw))
    with pytest.raises(sevcert.CertError, match="0x824"):
        sevcert.SevCert.decode(bytes(raw[:-1]))


def test_owner_session_round_trip_through_the_pdh() -> None:
    pdh_cert, pdh_key = sevcert.generate(sevcert.Usage.PDH)
    session = owner.make_session(pdh_cert, 0x5)
    godh = sevcert.SevCert.decode(session.godh)
    z = owner.shared_secret(pdh_key, godh)
    assert owner.unwrap_session(z, owner.SessionBlob.decode(session.session), 0x5) == (session.tek, session.tik)
    with pytest.raises(owner.PolicyMismatch):
        owner.unwrap_session(z, owner.SessionBlob.decode(session.session), 0x7)
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(owner.MacMismatch, match="WRAP_MAC"):
        owner.unwrap_session(owner.shared_secret(other, godh), owner.SessionBlob.decode(session.session), 0x5)


# --- real AMD certificates: virtee/sev tests/{naples,rome}/pdh.cert and pek.cert ---------------------------------
# Their numbers transcribed (P-384 coordinates and the PEK's ECDSA signature over the PDH body, as integers), and
# the SHA-256 of each pdh.cert file: rebuilt with vmmd's encoder, the certificate must be those very bytes and the
# AMD firmware's signature must verify over vmmd's idea of the body.
AMD_PDH = {
    "naples": dict(
        api=(0, 16), sha256="34b11563c32bd17b4e2b4b8205301af64e7bd06a85e2a6ada789bc9d5dfd9932",
        x=0x36024908d6d5b6a134c1c9aff652c39eaec13f3afeb487ac6210f119199e08e677245f8f4fe9c63ad525245457205295,
        y=0x3ec89bb2111b4297695805b4111982f44540f44bc45e5c19719dd726a1e05bb450a41736f6d21d84e92aab209ff16f03,
        r=0x928cdd2ad9d404df36951a83bf19017351841222c0a1ec5fde2020fa5bc75a8ecb729e8bce1e2a03ad47a23295cb2e5,
        s=0x5053647581e5ad17782f67cbbf7f4211a76081855b21d2030946e8ebb6f1e1ebc6a504632cf7a7bce7f8d5b6d912b69e,
        pek_x=0xb162f254ba358c4fa62dfe70c23c2d167c0033933744cb80d8c40afa677371fbb81f326c36f624fb5fdd7a2fda31532b,
        pek_y=0xa2ae9c53b7e8f865ace73e37d7df0ee8f2727bfd21bd4f8d89667cd2571d646899e0319a28f992ac53311636e343ef97),
    "rome": dict(
        api=(0, 22), sha256="62147c9375cb6cee32dbbf957d1b427e660c6dab2e6637c5f6c0e2c8f3345eed",
        x=0x40c3372aec5c7272f4f23b35880fc9efc2aca2d0e1103a5a2794780e624c2e0962ad942923969ef534b4be3f88bfac7,
        y=0xb638c93a699224fed2d4cb4bf9c4d23b5c8345c00561215fdd69d2ad244425d746089827631603ecc1db2b46aa902c07,
        r=0x56f97afe0b68cdc7d184122cad4d1e6f899bccb5b18553740aeec17b8691a0541d673d66648642211a17a0b9dbfab5c4,
        s=0xf5f60d7432022af79fb5b66c427341ce8da4740e1736cf19681452694bb2cfa1adec9cab06a504149e28770da985f2d5,
        pek_x=0x20481a12e369cbf1a355d90f94440400fd0eb28e17bbc5d474c9eb1f3c46764c0fabc1323764ddb2ec20954774ea2622,
        pek_y=0xd953458a1af90acac7596313af56e01d1c78b3e568e382d9108feac0d7efcec25d1da0ec146501bd02182448af352cf3),
}


@pytest.mark.parametrize("generation", sorted(AMD_PDH))
def test_amd_pdh_certificates_rebuild_and_verify(generation: str) -> None:
    import hashlib

    v = AMD_PDH[generation]
    pdh = sevcert.SevCert(sevcert.Usage.PDH, sevcert.Algo.ECDH_SHA256, sevcert.Curve.P384, v["x"], v["y"], *v["api"],
                          sigs=(sevcert.Signature(sevcert.Usage.PEK, sevcert.Algo.ECDSA_SHA256, v["r"], v["s"]),
                                sevcert.EMPTY_SIGNATURE))
    raw = pdh.encode()
    assert hashlib.sha256(raw).hexdigest() == v["sha256"]  # byte for byte the file virtee/sev ships
    assert sevcert.SevCert.decode(raw) == pdh
    pek = sevcert.SevCert(sevcert.Usage.PEK, sevcert.Algo.ECDSA_SHA256, sevcert.Curve.P384, v["pek_x"], v["pek_y"])
    sevcert.verify_signed_by(pdh, pek)  # the platform's own signature over the body as vmmd lays it out
    # and a session made for that real PDH has the layout LAUNCH_START takes
    made = owner.make_session(pdh, 0x5)
    assert len(made.godh) == 0x824 and len(made.session) == 128
