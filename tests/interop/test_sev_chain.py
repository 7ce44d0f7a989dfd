"""The SEV / SEV-ES chain check (vmmd/sev/amdcert.py, amdroots.py, sevchain.py) against real AMD certificates.

The platform certificates are virtee/sev's real-hardware vectors, tests/{naples,rome}/{pek,oca,cek}.cert
(github.com/virtee/sev, commit 9cf2adbffa209cc5becf7ff89ffdf624e7278ced, Apache-2.0): a Naples and a Rome
machine's PEK, OCA and the CEK as AMD's KDS signed it; their PDHs are in test_sevctl_vectors.py. Each is
transcribed as numbers with the SHA-256 of its file: rebuilt with vmmd's encoder it must be those very bytes.
The ARK/ASK pairs are the bundled ones (amdroots.py, transcribed from the same commit's builtin/). virtee/sev's
tests check the same links (tests/naples/{ark,ask,cek,oca,pek,pdh}.rs, tests/rome/...); the Milan root's
fingerprints are what `sevctl verify` printed on a Milan host in virtee/sevctl issue #185.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.interop.test_sevctl_vectors import AMD_PDH
from vmmd.sev import amdcert, amdroots, sevcert, sevchain
from vmmd.sev.sevcert import CertError

AMD_CHAIN = {
    "naples": {
        "PEK": dict(
            api=(0, 16), algo=0x2, sha256="31243368c2046fbf48e51a73075c33e69600cee1876919869f0383a94e8df558",
            x=0xb162f254ba358c4fa62dfe70c23c2d167c0033933744cb80d8c40afa677371fbb81f326c36f624fb5fdd7a2fda31532b,
            y=0xa2ae9c53b7e8f865ace73e37d7df0ee8f2727bfd21bd4f8d89667cd2571d646899e0319a28f992ac53311636e343ef97,
            sigs=[
            (0x1001, 0x2,
             0xda9c7a4296eec55447e61efac3b088d5f85678efcfff85cb73dbcdaccf699e550d6615d1939a6da8da6f8b1535e51554,
             0x6c4471f44387234b7869ddf40762e5285e0762b7e47560fd46d96270306fcb524c3359d297f3bb631440d9c78aa20b04),
            (0x1004, 0x2,
             0x7e0638d46648602a5291c1fc51013feded2b5be71b6fb2ba834250d636307c731e41e9331a36f0c05c9eda9502906e84,
             0x847de1cdf2f50118dd59751c6dbed3172b2599a9681c973c4c6827a9afc4a1c7413f90703d625af39f20e89d33bd872b),
            ]),
        "OCA": dict(
            api=(0, 16), algo=0x2, sha256="dfa8331592774030cc38716ee0d436aba269d7c17c78e2a261f19e967377c34c",
            x=0x3c10beb096684edf1913891c7d84a74255ddfc4ce878a22cd74bd540ed5ca1d3a48a740bf681d49c32b2b1f4e9d4d369,
            y=0xa218e21ac387afd0ccc1635e597c3a5ade4d8d6e38c75171024b13d0ca7a2e7addf74b4ea36dc78c48d5fc6cb181312,
            sigs=[
            (0x1001, 0x2,
             0xaa1f597c691510a48f7eb5fe0de69f1033615f244b0cbd65255d1c352910cd914d13a272b05b984dd60c4240e06c46bf,
             0x9552d2df25507381e6efe989b338f56875b68fffa508966d8fb9d0e2d94118d6f2066175d93f9f715b5a2f00e97c272c),
            ]),
        "CEK": dict(
            api=(0, 14), algo=0x2, sha256="cbecc40f5b7d7e988fe7e4af20195cc540404eb685a2b49df0160781d04cf8f4",
            x=0x8fa9d9ee066770df8323225d0a33e3de03c56b201dc31d6a84fdc7663fb6004fb88bc64366711a1f0f811e94376e5be5,
            y=0x60475c7a38adfd3bdda6c4467ddb82a9588177aa416328972978e740a1a0a6de7ca317362d0ae7cc5fa114d04aa6511f,
            sigs=[
            (0x13, 0x1, int(
                "a4e10b72001c65a670b166857cd9fc2a7a7587958273e8b267dcf96473012dc817d6a2827a73feef67d2308aa0a5cc09b90e"
                "0921fb33773ecfbeb092ca4836e58a51d7d96839b2fd2cc5a03ca90baf4c820de47d9791fa5335f904b7f3f1fd31cdb2a9d4"
                "4a8498d19d55a46f4470787f2b7146f8da592128bdb730118343263ffbe0d156f5ca551893df6d3f9e80e997611902f76d0a"
                "0989ecc72d566796d60dd29c6072aaa07527e63e20f5060adf95bbe6b686bc85f5ee42d2a191a93de151ab678623ae4cf21e"
                "0aa31385de4d3e126c0304d917ca746ad0843f6a1df2d407288ca7c4f0243d395644404f3eb56a9fa6976d4bd50622ff9ff5"
                "eaf9a0b748e4", 16)),
            ]),
    },
    "rome": {
        "PEK": dict(
            api=(0, 22), algo=0x2, sha256="fd5eb12d0175c91bcb83142811124ceba4f3f530307a2471fcbd633e5aead794",
            x=0x20481a12e369cbf1a355d90f94440400fd0eb28e17bbc5d474c9eb1f3c46764c0fabc1323764ddb2ec20954774ea2622,
            y=0xd953458a1af90acac7596313af56e01d1c78b3e568e382d9108feac0d7efcec25d1da0ec146501bd02182448af352cf3,
            sigs=[
            (0x1001, 0x2,
             0x89be3f9b9e325fd2e1f7d567b728414b47b1ecffb1404aa1ac5a2a9d738f876206cc86c7c3e5a1f3ce69b2f8afad00fd,
             0x303925c5c106c4534888c3cf8ad085e5c4fe31b22f3aaca4fc4a06343e78f8e4ec4a9149eef6bcdb22f9250ae95050fa),
            (0x1004, 0x2,
             0x8b5ce355beeb31c11602b9d42cef6327fd73e7a14d5ea3d65d5aab84911668fcbc709a18e16860bd0a20dc6883b1a706,
             0x4cc7711ea5b22f3268717b4b03865ab3333a30ea946f1a6572038eae16510c2da8cf7334f46611d55859a30e88c99817),
            ]),
        "OCA": dict(
            api=(0, 22), algo=0x2, sha256="fb72952d5c8640f0c144d3e250f5791c8b21d384071b75823430aaba69d9ad46",
            x=0x9f8451379b82f4cfe0dc54b47b30d0f3eb04321e32811628d6a4697e05484b461af2b2db5864212a5897ed2d97094370,
            y=0xe24e76d2c9ca9de0539f24abb3a112759e9d1a0190fad58cdaca5c7b25cb486a371a597f70ee8cdc161f317619d48410,
            sigs=[
            (0x1001, 0x2,
             0xd6690db922b107298bc07d5c1fff076172121a0cff846d21c386e6b0e021411ff56deb5984bf1b31dd4e1f2699d55765,
             0x8583d6299af8987cbf73f5024b517d91f34069884dffcc5e9fd6f469c5b5c748619093c393c3af194b8b4ef7d274850f),
            ]),
        "CEK": dict(
            api=(0, 14), algo=0x2, sha256="bfac4879e3855bf74b5e7841c46fbe02ee07808400ceb3eeccc9454d07e6eed5",
            x=0x29d1204ebcbbadc814ad6b072fc6aad4ccec6b82ebb41c29f72ac76f189d6f79252b8ffae9bc772a713a996719201429,
            y=0x7ca0e984428dfdf2411433622d977823dfd43d036aabc6b531024dd4ff9cf77a0360ab45abcec0cf5b1c416de8615da8,
            sigs=[
            (0x13, 0x101, int(
                "491f57f477dbabf2e85306d96f5570c88f523b2a7b2051b262d78c64804a50f41ade947c02704b773e064ec1116c6729aca7"
                "01eb2eb4e051522f5fea5869c4690afc1aacd8ca379c04fc4d4e652ff6aa957dd2af9c083b5529ee72b0d1d3a952c1ba6233"
                "f6f75d2b8cf8eba5df6098ec99ba098be6e8840e43ccf9e213c753251dbd0668b166b2b6e87cad55cdaa3f15e534f0dd789f"
                "d7ada2f35c295ec047e9b7d5a12a3f5ff3e8b2f504d87d56089dc13f94c9e4267d3b0b6408164749422120976d9863a851b2"
                "b9d4e88632fc6046efc7c0d65889b8883e23bfb5b79401ddabe30a7532c6e926defe4133c88df8d83ec08a32951dd92d525c"
                "57eac19739a5fd0fc49509f8bffe8190a6faa3f7533753a907c58ea5590b3d8284e2c42d8090bdda75afb3d455585f3f7786"
                "2f0c87a4c09631589f88f5e4dbf045a9342410254866a2adc6faa6c91d6a25141e3c1de556a90c0a25faaf4196c60d346d61"
                "c1102b11d24ea148fd12a6d6f05b8a04d1bb4584a460972e53564ce546d3cacaba65af265144d78c783943bc0f63270db642"
                "ca181c3ca1a38bbfe4bca3cf4130da11c2ad4e11526cbed6a153a0f22a5bca57dcee6941200e045dcd4f8a52ae4d2766d4ff"
                "15a977399e6edb1b8851e6d2eaee93993c156fe38a00412394b97ef9ad7e9759b688d7280ee170557da31b53962862f6a285"
                "3254cf40c9c35e9b0628965f", 16)),
            ]),
    },
}


def _sev_cert(role: str, v: dict) -> sevcert.SevCert:
    sigs = []
    for sig in v["sigs"]:
        if sig[1] in sevcert.RSA_ALGOS:
            sigs.append(sevcert.Signature(sig[0], sig[1], 0, 0, sig[2]))
        else:
            sigs.append(sevcert.Signature(*sig))
    sigs += [sevcert.EMPTY_SIGNATURE] * (2 - len(sigs))
    return sevcert.SevCert(sevcert.Usage[role], v["algo"], sevcert.Curve.P384, v["x"], v["y"], *v["api"],
                           sigs=tuple(sigs))


def _pdh(generation: str) -> sevcert.SevCert:
    v = AMD_PDH[generation]
    return sevcert.SevCert(sevcert.Usage.PDH, sevcert.Algo.ECDH_SHA256, sevcert.Curve.P384, v["x"], v["y"], *v["api"],
                           sigs=(sevcert.Signature(sevcert.Usage.PEK, sevcert.Algo.ECDSA_SHA256, v["r"], v["s"]),
                                 sevcert.EMPTY_SIGNATURE))


def _chain_bytes(generation: str) -> dict[str, bytes]:
    """The platform's files as vmmd rebuilds them, each checked against the SHA-256 of virtee's file."""
    out = {"PDH": _pdh(generation).encode()}
    assert hashlib.sha256(out["PDH"]).hexdigest() == AMD_PDH[generation]["sha256"]
    for role, v in AMD_CHAIN[generation].items():
        out[role] = _sev_cert(role, v).encode()
        assert hashlib.sha256(out[role]).hexdigest() == v["sha256"], role
    return out


GENERATIONS = {"naples": "Naples", "rome": "Rome"}


@pytest.mark.parametrize("generation", sorted(AMD_CHAIN))
def test_platform_certificates_rebuild_byte_for_byte(generation: str) -> None:
    for role, raw in _chain_bytes(generation).items():
        decoded = sevcert.SevCert.decode(raw)
        assert decoded.name == role and decoded.encode() == raw
    cek = sevcert.SevCert.decode(_chain_bytes(generation)["CEK"])
    assert cek.sigs[0].usage == amdcert.Usage.ASK and cek.sigs[0].algo in sevcert.RSA_ALGOS  # AMD's KDS signature


def test_bundled_roots_are_the_files_and_sign_each_other() -> None:
    pairs = amdroots.roots()  # builds each from its transcription and checks the SHA-256 of virtee's file
    assert [p.generation for p in pairs] == ["Naples", "Rome", "Milan", "Genoa", "Turin"]
    for pair in pairs:
        assert len(pair.ark.encode()) == len(pair.ask.encode()) == (0x340 if pair.generation == "Naples" else 0x640)
        assert amdcert.AmdCert.decode(pair.ark.encode()) == pair.ark
        amdcert.verify_signed_by(pair.ark, pair.ark)  # virtee tests/<gen>/ark.rs verify()
        amdcert.verify_signed_by(pair.ask, pair.ark)  # tests/<gen>/ask.rs verify()
        with pytest.raises(CertError):
            amdcert.verify_signed_by(pair.ark, pair.ask)  # `assert!((&ask, &ark).verify().is_err())`
    # what `sevctl verify` printed for the Milan ASK and ARK (virtee/sevctl issue #185): SHA-384 of each body
    milan = amdroots.by_generation("milan")
    assert hashlib.sha384(milan.ask.body()).hexdigest() == (
        "95cba79ba3c77daea79f741bade8156a50b1c59f6d6fda104d16dd264729f5ee8989522f3711fc7c84719921ceb31bc0")
    assert hashlib.sha384(milan.ark.body()).hexdigest() == (
        "569da618dfe64015c343db6d975e77b72fdeacd16edd02d9d09b889b8f0f1d91ffa5dfbd86f7ac574a1a7883b7a1e737")
    assert milan.ark.describe().startswith("ARK R4096 R384")  # sevctl's "ARK R4096 R384 <hash>"


def test_rsa_pss_parameters_are_exactly_virtees() -> None:
    """Salt = digest length, MGF1 over the key size's hash, the signature stored least significant byte first:
    any other choice fails on AMD's own signatures."""
    for pair in amdroots.roots():
        ark = pair.ark
        key, body, h = ark.public_key(), ark.body(), ark.hash
        sig = ark.signature.to_bytes(ark.size, "big")
        key.verify(sig, body, padding.PSS(padding.MGF1(h), h.digest_size), h)  # what amdcert does
        other = hashes.SHA256() if isinstance(h, hashes.SHA384) else hashes.SHA384()
        for salt, mgf, hash_, blob in ((h.digest_size - 1, h, h, sig), (0, h, h, sig), (h.digest_size, other, h, sig),
                                       (h.digest_size, h, other, sig), (h.digest_size, h, h, sig[::-1])):
            with pytest.raises(InvalidSignature):
                key.verify(blob, body, padding.PSS(padding.MGF1(mgf), salt), hash_)


@pytest.mark.parametrize("generation", sorted(AMD_CHAIN))
def test_real_chain_verifies_to_its_generation(generation: str) -> None:
    files = _chain_bytes(generation)
    found = sevchain.parse(b"".join(files[r] for r in ("PDH", "PEK", "OCA", "CEK")), "sev_chain.cert")
    verified = sevchain.verify_certificates(found)  # ASK/ARK: the bundled generation whose ASK signed the CEK
    assert verified.generation == GENERATIONS[generation] and verified.anchor.bundled
    ids = {"naples": "1bb987c3-5949-4606-b174-945601c9ea5b", "rome": "e6002122-fb58-4193-99d1-5fee7b131351"}
    assert f"ARK key id {ids[generation]}" in verified.describe()
    tree = verified.tree()
    assert tree[0].startswith("PDH EP384 D256 ") and tree[3].startswith("    ⬑ CEK EP384 E256 ")
    assert tree[5].startswith("         •⬑ ARK R") and len(tree) == 6
    # sevctl export --full's layout, PDH ‖ PEK ‖ OCA ‖ CEK ‖ ASK ‖ ARK, verifies the same way
    pair = amdroots.by_generation(generation)
    full = b"".join(files[r] for r in ("PDH", "PEK", "OCA", "CEK")) + pair.ask.encode() + pair.ark.encode()
    assert sevchain.verify_certificates(sevchain.parse(full, "full.cert")).generation == GENERATIONS[generation]
    # virtee's negative checks: no link holds the other way round
    certs = {role: sevcert.SevCert.decode(raw) for role, raw in files.items()}
    for cert, signer in ((certs["PEK"], certs["PDH"]), (certs["CEK"], certs["PEK"]), (certs["OCA"], certs["PEK"])):
        with pytest.raises(CertError):
            sevcert.verify_signed_by(cert, signer)


def _verify(generation: str, certs: dict, **replace):
    pair = amdroots.by_generation(generation)
    parts = {**{r: sevcert.SevCert.decode(raw) for r, raw in certs.items()}, "ASK": pair.ask, "ARK": pair.ark}
    parts.update(replace)
    return sevchain.verify_chain(parts["PDH"], parts["PEK"], parts["OCA"], parts["CEK"], parts["ASK"], parts["ARK"],
                                 sevchain.bundled_anchors())


def _flip(raw: bytes, offset: int) -> bytes:
    b = bytearray(raw)
    b[offset] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("generation", sorted(AMD_CHAIN))
def test_a_flipped_byte_in_any_link_fails_naming_it(generation: str) -> None:
    files = _chain_bytes(generation)
    _verify(generation, files)
    # a signed byte (API minor at 0x005; it is in every body) and a byte of the first signature's value (slot 1 at
    # 0x414, slot 2 at 0x61C: u32 usage, u32 algorithm, then the numbers)
    for role, expected in (("PDH", "the PDH is not signed by the PEK"), ("OCA", "the OCA is not self-signed"),
                           ("CEK", "the CEK is not signed by the ASK")):
        for offset in (0x005, 0x414 + 8 + 20):
            with pytest.raises(CertError, match=expected):
                _verify(generation, {**files, role: _flip(files[role], offset)})
    with pytest.raises(CertError, match="the PEK is not signed by the OCA"):
        _verify(generation, {**files, "PEK": _flip(files["PEK"], 0x005)})
    with pytest.raises(CertError, match="the PEK is not signed by the OCA"):
        _verify(generation, {**files, "PEK": _flip(files["PEK"], 0x414 + 8 + 20)})  # slot 1: the OCA's signature
    with pytest.raises(CertError, match="the PEK is not signed by the CEK"):
        _verify(generation, {**files, "PEK": _flip(files["PEK"], 0x61C + 8 + 20)})  # slot 2: the CEK's
    # the AMD certificates: a reserved header byte (signed) and a signature byte
    pair = amdroots.by_generation(generation)
    for role, offset, expected in (("ASK", 0x28, "the ASK is not signed by the ARK"),
                                   ("ASK", amdcert.HEADER_SIZE + 2 * pair.ask.size + 7, "the ASK is not signed by"),
                                   ("ARK", 0x28, "not one of the trusted AMD roots"),
                                   ("ARK", amdcert.HEADER_SIZE + 2 * pair.ark.size + 7, "the ARK is not self-signed")):
        cert = getattr(pair, role.lower())
        with pytest.raises(CertError, match=expected):
            _verify(generation, files, **{role: amdcert.AmdCert.decode(_flip(cert.encode(), offset))})


def test_another_generations_roots_or_an_unknown_root_fail() -> None:
    files = _chain_bytes("naples")
    rome = amdroots.by_generation("rome")
    with pytest.raises(CertError, match="the CEK is not signed by the ASK"):
        _verify("naples", files, ASK=rome.ask, ARK=rome.ark)
    # a root of one's own that signs the real CEK (a second signature in its free slot): every signature holds, but
    # the ARK is no AMD root, so the chain does not verify, unless that ARK is made a trust anchor
    ark_key, ask_key = (rsa.generate_private_key(65537, 2048) for _ in range(2))
    ark = amdcert.make(ark_key, amdcert.Usage.ARK, b"not-amd-ark-0001")
    ask = amdcert.make(ask_key, amdcert.Usage.ASK, b"not-amd-ask-0001", ark_key, ark.key_id)
    cek = sevcert.SevCert.decode(files["CEK"])
    forged = sevcert.Signature(amdcert.Usage.ASK, sevcert.Algo.RSA_SHA256, 0, 0,
                               amdcert.rsa_pss_sign(ask_key, cek.body()))
    cek = dataclasses.replace(cek, sigs=(cek.sigs[0], forged))
    with pytest.raises(CertError, match=r"the ARK \(ARK R2048 R256 key id .*\) is not one of the trusted AMD roots "
                                        r"\(Naples, Rome, Milan, Genoa, Turin\)"):
        _verify("naples", files, CEK=cek, ASK=ask, ARK=ark)
    own = sevchain.TrustAnchor("my root", ark)
    pdh, pek, oca = (sevcert.SevCert.decode(files[r]) for r in ("PDH", "PEK", "OCA"))
    assert sevchain.verify_chain(pdh, pek, oca, cek, ask, ark, [own]).generation == "my root"


def test_amds_naples_ark_without_its_signature_decodes_as_virtees_does() -> None:
    naples = amdroots.by_generation("naples")
    published = naples.ask.encode() + naples.ark.body()  # AMD's ask_ark_naples.cert: the ARK ends at its modulus
    assert len(naples.ark.body()) == 576
    ask, ark = amdcert.split_ask_ark(published)
    assert ark == naples.ark and ask == naples.ask  # virtee tests/naples/ark.rs decode(): ARK_BAD decodes to ARK
    with pytest.raises(CertError, match="only 576 are there"):
        amdcert.AmdCert.decode(amdroots.by_generation("rome").ark.encode()[:576])
    with pytest.raises(CertError, match="not the ASK"):
        amdcert.split_ask_ark(naples.ark.encode() + naples.ask.encode())


def test_parse_refuses_conflicting_or_foreign_data() -> None:
    files = _chain_bytes("rome")
    with pytest.raises(CertError, match="two different PDH certificates"):
        found = sevchain.parse(files["PDH"], "a")
        sevchain.parse(_pdh("naples").encode(), "b", found)
    with pytest.raises(CertError, match="byte 2084 of x starts neither an SEV certificate"):
        sevchain.parse(files["PDH"] + bytes(100), "x")
    with pytest.raises(CertError, match="lacks the OCA, CEK certificates"):
        sevchain.verify_certificates(sevchain.parse(files["PDH"] + files["PEK"], "pdh+pek"))
