"""vmmd.daemon.definitions: TOML guest definitions and their error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmmd.daemon.definitions import DefinitionError, load_directory, load_file, parse_definition

FW = "/opt/fw/hello.bin"


def parse(text: str, **kw):
    return parse_definition(text, "/etc/vmmd/vms/t.toml", kw.pop("name", "t"), kw.pop("owner", 0),
                            Path("/etc/vmmd/vms"))


def test_full_definition():
    d = parse(f'''
firmware = "{FW}"
memory = "128M"
vcpus = 2
platform = "sev-es"
timeout = 5
guest_arg = 7
owner = 1000
[policy]
flags = ["NODBG", "NOKS"]
[console]
ring = "8K"
log = false
[network]
mode = "tap"
bridge = "br0"
''')
    assert d.name == "t" and d.firmware == Path(FW) and d.memory_bytes == 128 << 20 and d.cpus == 2
    assert d.platform == "sev-es" and d.timeout == 5.0 and d.guest_arg == 7 and d.owner == 1000
    assert d.policy == 0b111  # NODBG | NOKS | ES
    assert d.ring_bytes == 8 << 10 and d.log_console is False and d.net == "tap:br0"
    cfg = d.machine_config()
    assert cfg.memory_bytes == 128 << 20 and cfg.cpus == 2 and cfg.net == "tap:br0" and cfg.name == "t"


def test_defaults_and_relative_firmware():
    d = parse('firmware = "hello.bin"\n')
    assert d.firmware == Path("/etc/vmmd/vms/hello.bin")
    assert (d.memory_bytes, d.cpus, d.platform, d.timeout, d.policy, d.net) == (64 << 20, 1, "auto", None, None, None)


@pytest.mark.parametrize("text, key, words", [
    (f'firmware = "{FW}"\nplatform = "sev-snp"\n', "platform", "auto, plain, sev-es, sev-es-emu"),
    (f'firmware = "{FW}"\nmemroy = "1G"\n', "memroy", "allowed: name, firmware, kernel, initrd, append, memory"),
    ('memory = "64M"\n', "firmware", "missing"),
    (f'firmware = "{FW}"\nmemory = "lots"\n', "memory", "not a size"),
    (f'firmware = "{FW}"\nvcpus = 0\n', "vcpus", "must be 1.."),
    (f'firmware = "{FW}"\nvcpus = "2"\n', "vcpus", "must be an integer"),
    (f'firmware = "{FW}"\ntimeout = -1\n', "timeout", "above 0"),
    (f'firmware = "{FW}"\nowner = "no-such-user-xyz"\n', "owner", "no such user"),
    (f'firmware = "{FW}"\nname = "bad/name"\n', "name", "not valid"),
    (f'firmware = "{FW}"\nname = "run-4242"\n', "name", "reserved: run-NUMBER names the guests of `vmctl run`"),
    (f'firmware = "{FW}"\n[policy]\nflags = ["NODEBUG"]\n', "policy.flags", "unknown SEV policy flag"),
    (f'firmware = "{FW}"\n[policy]\nlevel = 3\n', "policy.level", "allowed: policy.flags"),
    (f'firmware = "{FW}"\n[console]\nring = "1K"\n', "console.ring", "4K..16M"),
    (f'firmware = "{FW}"\n[console]\nlog = "yes"\n', "console.log", "true or false"),
    (f'firmware = "{FW}"\n[network]\nmode = "bridge"\n', "network.mode", "none, tap"),
    (f'firmware = "{FW}"\n[network]\nbridge = "br0"\n', "network.bridge", "only with mode"),
])
def test_errors_name_file_key_and_allowed_values(text, key, words):
    with pytest.raises(DefinitionError) as info:
        parse(text)
    message = str(info.value)
    assert message.startswith(f"/etc/vmmd/vms/t.toml: key '{key}'"), message
    assert words in message, message


def test_not_toml_and_machine_limits():
    with pytest.raises(DefinitionError, match=r"t.toml: not valid TOML"):
        parse("firmware = \n")
    with pytest.raises(DefinitionError, match=r"t.toml: memory size .* not a multiple of 4 KiB"):
        parse(f'firmware = "{FW}"\nmemory = 4097\n')


def test_directory_collects_errors_per_file(tmp_path):
    (tmp_path / "a.toml").write_text(f'firmware = "{FW}"\n')
    (tmp_path / "b.toml").write_text(f'firmware = "{FW}"\nname = "a"\n')
    (tmp_path / "c.toml").write_text("vcpus = 1\n")
    (tmp_path / "notes.txt").write_text("ignored")
    definitions, errors = load_directory(tmp_path)
    assert list(definitions) == ["a"]
    assert len(errors) == 2
    assert any(str(tmp_path / "b.toml") in e and "already defined" in e for e in errors)
    assert any(str(tmp_path / "c.toml") in e and "key 'firmware'" in e for e in errors)
    assert load_file(tmp_path / "a.toml").source == str(tmp_path / "a.toml")


def test_network_section_maps_to_net_spec(tmp_path) -> None:
    from vmmd.daemon.definitions import DefinitionError, load_file
    from vmmd.net.attach import parse_net_spec

    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"\xf4" * 16)
    path = tmp_path / "g.toml"
    path.write_text(f'firmware = "{firmware}"\n[network]\nmode = "tap"\nbridge = "br9"\ncreate_bridge = true\n'
                    'mac = "02:00:00:aa:bb:cc"\nmtu = 1400\n')
    definition = load_file(path)
    spec = parse_net_spec(definition.net)
    assert spec.bridge == "br9" and spec.create_bridge and spec.mtu == 1400
    assert spec.mac == bytes.fromhex("020000aabbcc")
    for bad, key in [('mtu = 10', "network.mtu"), ('mac = "zz"', "network.mac"),
                     ('create_bridge = "yes"', "network.create_bridge")]:
        path.write_text(f'firmware = "{firmware}"\n[network]\nmode = "tap"\nbridge = "br9"\n{bad}\n')
        with pytest.raises(DefinitionError) as err:
            load_file(path)
        assert f"key '{key}'" in str(err.value) and str(path) in str(err.value)


def test_every_net_option_is_a_network_key(tmp_path) -> None:
    """[network] takes exactly the options `vmctl run --net` does (NET_OPTIONS), "_" for "-"."""
    from vmmd.daemon.definitions import DefinitionError, load_file
    from vmmd.net.attach import NET_OPTIONS, parse_net_spec

    firmware = tmp_path / "fw.bin"
    firmware.write_bytes(b"\xf4" * 16)
    path = tmp_path / "g.toml"
    values = {"mac": '"02:00:00:aa:bb:cc"', "mtu": "9000", "ifname": '"tap-web"', "host-ip": '"10.9.0.1/24"',
              "vhost": '"off"'}
    body = "\n".join(f"{o.replace('-', '_')} = {values[o] if takes_value else 'true'}"
                     for o, takes_value in NET_OPTIONS.items())
    path.write_text(f'firmware = "{firmware}"\n[network]\nmode = "tap"\nbridge = "br9"\n{body}\n')
    spec = parse_net_spec(load_file(path).net)
    assert (spec.ifname, spec.host_ip, spec.mtu, spec.vnet_hdr, spec.create_bridge, spec.vhost) == \
        ("tap-web", "10.9.0.1/24", 9000, True, True, "off")
    path.write_text(f'firmware = "{firmware}"\n[network]\nhost_ip = "10.9.0.1/24"\n')
    with pytest.raises(DefinitionError) as err:
        load_file(path)
    assert "network.host_ip" in str(err.value) and "needs mode" in str(err.value)


def test_disk_tables_take_the_run_options():
    from vmmd.block.image import DiskSpec

    d = parse(f'''
firmware = "{FW}"
[[disk]]
path = "data.img"
serial = "d0"
[[disk]]
path = "/srv/base.img"
ro = true
cache = "none"
''')
    assert d.disks == (DiskSpec("/etc/vmmd/vms/data.img", serial="d0"), DiskSpec("/srv/base.img", True, "none"))
    assert d.machine_config().disks == d.disks
    assert d.summary()["disks"][1] == {"path": "/srv/base.img", "ro": True, "cache": "none", "serial": ""}


@pytest.mark.parametrize("tables, message", [
    ('[[disk]]\nro = true', "disk[0]': a disk needs the path"),
    ('[[disk]]\npath = "a.img"\ncache = "fast"', "disk[0]': cache='fast'"),
    ('[[disk]]\npath = "a.img"\nsize = 5', "disk[0]': unknown option 'size'"),
    ('disk = "a.img"', "key 'disk': must be tables"),
    ("\n".join(['[[disk]]\npath = "a.img"'] * 5), "5 disks asked for; a guest has at most 4"),
])
def test_bad_disk_tables_are_named(tables, message):
    with pytest.raises(DefinitionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(f'firmware = "{FW}"\n{tables}\n')


def test_a_direct_linux_boot_definition() -> None:
    d = parse('kernel = "vmlinuz"\ninitrd = "/boot/initrd.gz"\nappend = "console=ttyS0 quiet"\nmemory = "512M"\n')
    assert d.firmware is None and d.kernel == Path("/etc/vmmd/vms/vmlinuz")  # relative to the definition's folder
    assert d.initrd == Path("/boot/initrd.gz") and d.append == "console=ttyS0 quiet"
    assert d.boot_files == [("kernel", d.kernel), ("initrd", d.initrd)]
    config = d.machine_config()
    assert (config.kernel, config.initrd, config.append) == (d.kernel, d.initrd, d.append)
    assert d.summary()["kernel"] == "/etc/vmmd/vms/vmlinuz" and d.summary()["firmware"] is None
    assert parse('kernel = "k"\n').boot_files == [("kernel", Path("/etc/vmmd/vms/k"))]


@pytest.mark.parametrize(("text", "key", "words"), [
    ('firmware = "a"\nkernel = "b"\n', "firmware", "not both"),
    ('memory = "64M"\n', "firmware", "or kernel"),
    ('firmware = "a"\ninitrd = "i"\n', "initrd", "goes with kernel"),
    ('firmware = "a"\nappend = "x"\n', "append", "goes with kernel"),
    ('kernel = "k"\nappend = 3\n', "append", "command line"),
    ('kernel = ""\n', "kernel", "file path"),
])
def test_linux_keys_are_checked(text: str, key: str, words: str) -> None:
    with pytest.raises(DefinitionError) as err:
        parse(text)
    assert f"key '{key}'" in str(err.value) and words in str(err.value)
