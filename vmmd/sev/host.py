"""What this host can run: /dev/kvm, the SEV firmware, kvm_amd, the CPU, memlock; and why SEV-ES is (not) there.

`host_report()` gathers facts (each probe is independent and never raises) and ends with a
conclusion per platform (plain, sev-es-emu, sev-es). For sev-es it names the *first* missing
prerequisite, in the order a user has to fix them, and lists every other one it found.
`format_host_report()` renders the same dict for humans (`vmctl host`; `--json` prints the dict).

Sources: Documentation/virt/kvm/x86/amd-memory-encryption.rst (CPUID 0x8000001F, KVM_X86_GRP_SEV,
KVM_SEV_INIT2 vs legacy KVM_SEV_ES_INIT), arch/x86/kvm/svm/sev.c sev_hardware_setup() (module
parameters sev / sev_es / debug_swap), sev_pin_memory() (RLIMIT_MEMLOCK unless CAP_IPC_LOCK),
include/uapi/linux/psp-sev.h (PLATFORM_STATUS flags), AMD APM vol. 3 / CPUID spec 25481
(Fn8000_001F: EAX[1] SEV, EAX[3] SEV-ES, EBX[5:0] C-bit position).
"""

from __future__ import annotations

import os
import platform
import resource
import stat
import struct
from pathlib import Path

from vmmd.errors import VmmdError
from vmmd.hostcpu import host_cpuid
from vmmd.kvm.uapi import KVM_CAP_VM_TYPES, KVM_CAP_X86_MSR_FILTER, KVM_CAP_X86_USER_SPACE_MSR
from vmmd.machine import layout as L
from vmmd.sev import uapi

KVM_DEVICE = "/dev/kvm"
SEV_DEVICE = "/dev/sev"
KVM_AMD_PARAMS = Path("/sys/module/kvm_amd/parameters")
CAP_IPC_LOCK = 14




def _cpu_facts() -> dict:
    facts: dict = {}
    try:
        _max_leaf, ebx, ecx, edx = host_cpuid(0)
        vendor = struct.pack("<3I", ebx, edx, ecx).decode("ascii", "replace")
        facts["vendor"] = vendor
        facts["amd"] = vendor == "AuthenticAMD"
        brand = b""
        max_ext = host_cpuid(0x8000_0000)[0]
        facts["max_extended_leaf"] = max_ext
        if max_ext >= 0x8000_0004:
            for leaf in (0x8000_0002, 0x8000_0003, 0x8000_0004):
                brand += struct.pack("<4I", *host_cpuid(leaf))
        facts["model_name"] = brand.rstrip(b"\0").decode("ascii", "replace").strip()
        if max_ext >= 0x8000_001F:
            eax, ebx, ecx, edx = host_cpuid(0x8000_001F)
            facts["leaf_8000001f"] = {
                "eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx,
                "sme": bool(eax & 1 << 0), "sev": bool(eax & 1 << 1), "page_flush_msr": bool(eax & 1 << 2),
                "sev_es": bool(eax & 1 << 3), "sev_snp": bool(eax & 1 << 4),
                "c_bit_position": ebx & 0x3F, "phys_addr_reduction": (ebx >> 6) & 0x3F,
                "encrypted_guests": ecx, "min_sev_asid": edx,
            }
        else:
            facts["leaf_8000001f"] = None
    except OSError as err:
        facts["error"] = f"CPUID unavailable: {err}"
    return facts


def _device_facts(path: str) -> dict:
    facts: dict = {"path": path, "present": os.path.exists(path)}
    if facts["present"]:
        st = os.stat(path)
        facts["mode"] = stat.filemode(st.st_mode)
        facts["owner_uid"] = st.st_uid
        facts["group_gid"] = st.st_gid
        facts["accessible_rw"] = os.access(path, os.R_OK | os.W_OK)
    return facts


def _kvm_facts() -> dict:
    facts = _device_facts(KVM_DEVICE)
    if not facts["present"] or not facts["accessible_rw"]:
        return facts
    from vmmd.kvm import Kvm  # the system fd class (KVM_GET_API_VERSION checked on open)
    try:
        kvm = Kvm(KVM_DEVICE)
    except (VmmdError, OSError) as err:
        facts["error"] = str(err)
        return facts
    try:
        import fcntl

        from vmmd.kvm.ioctls import KVM_GET_API_VERSION
        facts["api_version"] = fcntl.ioctl(kvm.fd, KVM_GET_API_VERSION)
        vm_types = kvm.check_extension(KVM_CAP_VM_TYPES)
        facts["vm_types"] = vm_types
        facts["vm_type_names"] = [name for bit, name in ((uapi.KVM_X86_DEFAULT_VM, "DEFAULT"),
                                                          (uapi.KVM_X86_SW_PROTECTED_VM, "SW_PROTECTED"),
                                                          (uapi.KVM_X86_SEV_VM, "SEV"),
                                                          (uapi.KVM_X86_SEV_ES_VM, "SEV_ES"), (4, "SNP"))
                                  if vm_types & (1 << bit)]
        facts["sev_es_vm_type"] = bool(vm_types & (1 << uapi.KVM_X86_SEV_ES_VM))
        features = kvm.get_device_attr(uapi.KVM_X86_GRP_SEV, uapi.KVM_X86_SEV_VMSA_FEATURES)
        facts["sev_vmsa_features"] = features  # None: no KVM_X86_GRP_SEV (pre-6.10 or SEV off)
        if features is not None:
            facts["sev_vmsa_feature_names"] = [name for bit, name in uapi.VMSA_FEATURE_NAMES.items() if features & bit]
        facts["user_space_msr"] = bool(kvm.check_extension(KVM_CAP_X86_USER_SPACE_MSR))
        facts["msr_filter"] = bool(kvm.check_extension(KVM_CAP_X86_MSR_FILTER))
    finally:
        kvm.close()
    return facts


def _read_param(name: str) -> str | None:
    try:
        return (KVM_AMD_PARAMS / name).read_text().strip()
    except OSError:
        return None


def _kvm_amd_facts() -> dict:
    loaded = Path("/sys/module/kvm_amd").is_dir()
    facts: dict = {"loaded": loaded}
    if loaded:
        for name in ("sev", "sev_es", "sev_snp", "debug_swap"):
            facts[name] = _read_param(name)
    try:
        facts["kvm_modules"] = sorted(p.name for p in Path("/sys/module").iterdir()
                                      if p.name == "kvm" or p.name.startswith("kvm_"))
    except OSError:
        facts["kvm_modules"] = []
    return facts


def _sev_facts() -> dict:
    facts = _device_facts(SEV_DEVICE)
    if facts["present"] and facts["accessible_rw"]:
        from vmmd.sev.psp import Psp, SevError
        try:
            with Psp(SEV_DEVICE) as psp:
                facts["platform_status"] = psp.platform_status().as_dict()
        except (SevError, VmmdError, OSError) as err:
            facts["error"] = str(err)
    return facts




def _guest_code_facts() -> dict:
    from vmmd.kvm import Kvm
    from vmmd.kvm.probe import guest_code_emulated_reason

    kvm = None
    try:
        kvm = Kvm()
        reason = guest_code_emulated_reason(kvm)
    except (VmmdError, OSError) as err:
        reason = f"the guest-code probe could not run: {err}"
    finally:
        if kvm is not None:
            kvm.close()
    return {"native": reason is None, "reason": reason}


def _memlock_facts(memory_bytes: int | None) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    cap_ipc_lock = False
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                cap_ipc_lock = bool(int(line.split()[1], 16) & (1 << CAP_IPC_LOCK))
    except OSError:
        pass
    unlimited = soft == resource.RLIM_INFINITY
    # sev_pin_memory(): REG_REGION pins guest RAM, and LAUNCH_UPDATE_DATA pins each measured region again while
    # it runs; the largest region is the firmware image, at most the 16 MiB a reset-vector image may have.
    needed = None if memory_bytes is None else memory_bytes + L.RESET_VECTOR_MAX_BYTES
    facts = {"soft": None if unlimited else soft, "hard": None if hard == resource.RLIM_INFINITY else hard,
             "cap_ipc_lock": cap_ipc_lock, "guest_bytes": memory_bytes, "needed_bytes": needed}
    facts["sufficient"] = (cap_ipc_lock or unlimited or needed is None or soft >= needed)
    return facts


def _is_yes(value: str | None) -> bool:
    return value is not None and value.upper() in ("Y", "1")


def _sev_es_blockers(report: dict) -> list[str]:
    """Every missing prerequisite for the sev-es platform, in the order to fix them."""
    kvm, cpu, amd, sev, mem = report["kvm"], report["cpu"], report["kvm_amd"], report["sev_device"], report["memlock"]
    out: list[str] = []
    if not kvm["present"]:
        out.append(f"{KVM_DEVICE} does not exist: load kvm_amd and enable SVM in the firmware setup")
    elif not kvm.get("accessible_rw"):
        out.append(f"{KVM_DEVICE} is not read-write accessible to this user (mode {kvm.get('mode')})")
    elif "error" in kvm:
        out.append(f"{KVM_DEVICE} cannot be used: {kvm['error']}")
    if "error" in cpu:
        out.append(cpu["error"])
    elif not cpu.get("amd"):
        out.append(f"the CPU vendor is {cpu.get('vendor')} ({cpu.get('model_name') or 'unknown model'}): SEV-ES needs "
                   "an AMD EPYC processor (7002 'Rome' or later)")
    else:
        leaf = cpu.get("leaf_8000001f")
        if leaf is None:
            out.append("CPUID leaf 0x8000001F (memory encryption) is absent: this AMD CPU (or the hypervisor "
                       "under this host) has no SEV")
        elif not leaf["sev"]:
            out.append("CPUID 0x8000001F EAX[1] (SEV) is clear: SEV is not supported or not enabled in the "
                       "firmware setup (SMEE / SEV ASID space)")
        elif not leaf["sev_es"]:
            out.append("CPUID 0x8000001F EAX[3] (SEV-ES) is clear: this processor does not support SEV-ES")
    if not amd["loaded"]:
        modules = ", ".join(amd.get("kvm_modules") or []) or "none"
        out.append(f"the kvm_amd module is not loaded (KVM modules loaded: {modules}): "
                   "`modprobe kvm_amd sev=1 sev_es=1`")
    else:
        if not _is_yes(amd.get("sev")):
            out.append(f"kvm_amd parameter sev is {amd.get('sev')!r}: reload with `modprobe kvm_amd sev=1 sev_es=1`"
                       " (the firmware, ccp/PSP, must be ready when kvm_amd loads)")
        if not _is_yes(amd.get("sev_es")):
            out.append(f"kvm_amd parameter sev_es is {amd.get('sev_es')!r}: reload with `modprobe kvm_amd sev_es=1`;"
                       " it also needs SEV-ES ASIDs (BIOS 'SEV-ES ASID space limit' > 1)")
    if not sev["present"]:
        out.append(f"{SEV_DEVICE} does not exist: the ccp driver is not loaded or found no SEV firmware "
                   "(`modprobe ccp`)")
    elif not sev.get("accessible_rw"):
        out.append(f"{SEV_DEVICE} is not read-write accessible to this user (mode {sev.get('mode')})")
    elif "error" in sev:
        out.append(f"SEV_PLATFORM_STATUS failed: {sev['error']}")
    elif not sev.get("platform_status", {}).get("es_supported"):
        out.append("the SEV firmware does not report SEV-ES (PLATFORM_STATUS flags bit 8 clear)")
    if not mem["sufficient"]:
        out.append(f"RLIMIT_MEMLOCK is {mem['soft']} bytes but the guest needs up to {mem['needed_bytes']} bytes "
                   f"pinned ({mem['guest_bytes']} of RAM for KVM_MEMORY_ENCRYPT_REG_REGION, plus the firmware image "
                   "LAUNCH_UPDATE_DATA pins again while it measures it, up to 16 MiB): raise it (ulimit -l, "
                   "LimitMEMLOCK=) or run with CAP_IPC_LOCK")
    return out


def host_report(memory_bytes: int | None = None, probe_guest_code: bool = False) -> dict:
    """Facts about this host for the three platforms, plus a conclusion. JSON-serialisable; never raises.
    `probe_guest_code` also runs a throw-away guest to learn whether guest kernel code runs natively
    (vmmd.kvm.probe; `vmctl host` does, platform selection does not need to)."""
    report: dict = {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "kvm": _kvm_facts(),
        "cpu": _cpu_facts(),
        "kvm_amd": _kvm_amd_facts(),
        "sev_device": _sev_facts(),
        "memlock": _memlock_facts(memory_bytes),
    }
    kvm = report["kvm"]
    kvm_ok = kvm["present"] and kvm.get("accessible_rw", False) and "error" not in kvm
    kvm_reason = None if kvm_ok else (kvm.get("error") or f"{KVM_DEVICE} is missing or not accessible read-write")
    if probe_guest_code:
        report["guest_code"] = _guest_code_facts() if kvm_ok else {"native": None, "reason": kvm_reason}
    platforms: dict = {"plain": {"available": kvm_ok, "reason": kvm_reason}}
    emu_reason = kvm_reason
    if kvm_ok and not (kvm.get("user_space_msr") and kvm.get("msr_filter")):
        emu_reason = "KVM lacks KVM_CAP_X86_USER_SPACE_MSR / KVM_CAP_X86_MSR_FILTER (Linux 5.10+)"
    platforms["sev-es-emu"] = {"available": emu_reason is None, "reason": emu_reason}
    blockers = _sev_es_blockers(report)
    sev_es: dict = {"available": not blockers, "reason": blockers[0] if blockers else None, "missing": blockers}
    if not blockers:
        if kvm.get("sev_es_vm_type"):
            sev_es["launch_path"] = "KVM_X86_SEV_ES_VM + KVM_SEV_INIT2"
        else:
            sev_es["launch_path"] = "legacy KVM_SEV_ES_INIT on the default VM type (kernel before 6.10)"
    platforms["sev-es"] = sev_es
    report["platforms"] = platforms
    report["sev_es_available"] = sev_es["available"]  # shortcuts for vmmd.machine.platform
    report["sev_es_reason"] = sev_es["reason"]
    return report


def _yn(value) -> str:
    return "yes" if value else "no"


def format_host_report(report: dict) -> str:
    """The report as aligned text lines for a terminal."""
    lines: list[str] = []
    add = lines.append
    add(f"kernel            {report['kernel']} ({report['machine']})")
    kvm = report["kvm"]
    if not kvm["present"]:
        add(f"{KVM_DEVICE:<17} missing")
    else:
        add(f"{KVM_DEVICE:<17} {kvm['mode']} rw={_yn(kvm.get('accessible_rw'))}"
            + (f" API {kvm['api_version']}" if "api_version" in kvm else "")
            + (f" error: {kvm['error']}" if "error" in kvm else ""))
        if "vm_types" in kvm:
            names = ", ".join(kvm["vm_type_names"]) or "none reported"
            add(f"  VM types        {kvm['vm_types']:#x} ({names})")
            features = kvm["sev_vmsa_features"]
            add("  SEV VMSA feats  " + ("no KVM_X86_GRP_SEV attribute" if features is None else
                                        f"{features:#x} ({', '.join(kvm['sev_vmsa_feature_names']) or 'none'})"))
            add(f"  user MSR exits  {_yn(kvm['user_space_msr'])}, MSR filter {_yn(kvm['msr_filter'])}")
    code = report.get("guest_code", {})
    if code.get("native") is not None:
        add("  guest code      " + ("runs natively" if code["native"] else f"emulated: {code['reason']}"))
    cpu = report["cpu"]
    if "error" in cpu:
        add(f"cpu               {cpu['error']}")
    else:
        add(f"cpu               {cpu['vendor']} {cpu.get('model_name', '')}".rstrip())
        leaf = cpu.get("leaf_8000001f")
        if leaf is None:
            add(f"  CPUID 8000001F  absent (max extended leaf {cpu['max_extended_leaf']:#x})")
        else:
            add(f"  CPUID 8000001F  SEV {_yn(leaf['sev'])}, SEV-ES {_yn(leaf['sev_es'])}, SNP {_yn(leaf['sev_snp'])}, "
                f"C-bit {leaf['c_bit_position']}, {leaf['encrypted_guests']} encrypted guests, "
                f"min SEV ASID {leaf['min_sev_asid']}")
    amd = report["kvm_amd"]
    if amd["loaded"]:
        add(f"kvm_amd           sev={amd.get('sev')} sev_es={amd.get('sev_es')} sev_snp={amd.get('sev_snp')} "
            f"debug_swap={amd.get('debug_swap')}")
    else:
        add(f"kvm_amd           not loaded (loaded: {', '.join(amd.get('kvm_modules') or []) or 'none'})")
    sev = report["sev_device"]
    if not sev["present"]:
        add(f"{SEV_DEVICE:<17} missing")
    else:
        add(f"{SEV_DEVICE:<17} {sev['mode']} rw={_yn(sev.get('accessible_rw'))}"
            + (f" error: {sev['error']}" if "error" in sev else ""))
        status = sev.get("platform_status")
        if status:
            add(f"  firmware        API {status['api_version']} build {status['build']}, state {status['state']}, "
                f"SEV-ES {_yn(status['es_supported'])}, {status['guest_count']} guests")
    mem = report["memlock"]
    soft = "unlimited" if mem["soft"] is None else f"{mem['soft']} bytes"
    guest = "" if mem["guest_bytes"] is None else f", guest needs up to {mem['needed_bytes']} bytes"
    add(f"RLIMIT_MEMLOCK    {soft}, CAP_IPC_LOCK {_yn(mem['cap_ipc_lock'])}{guest}"
        + ("" if mem["sufficient"] else " -> insufficient"))
    add("platforms:")
    for name, verdict in report["platforms"].items():
        if verdict["available"]:
            extra = f" ({verdict['launch_path']})" if verdict.get("launch_path") else ""
            add(f"  {name:<11} available{extra}")
        else:
            add(f"  {name:<11} unavailable: {verdict['reason']}")
            for other in verdict.get("missing", [])[1:]:
                add(f"  {'':<11}   also: {other}")
    return "\n".join(lines)
