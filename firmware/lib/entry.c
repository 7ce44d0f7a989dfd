/*
 * Start-up and shut-down of a test guest: boot-info check, platform probe
 * (README.md "What a guest sees on sev-es-emu"), GHCB
 * protocol version negotiation over the GHCB MSR protocol (Linux
 * arch/x86/boot/compressed/sev.c sev_es_negotiate_protocol()), and the ways a
 * guest ends: isa-debug-exit write, GHCB termination, hlt.
 */
#include "fw.h"

struct fw_state fw;

void fw_entry(uint64_t cpu, const struct vmmd_bootinfo *bi);

const char *fw_platform_name(uint32_t platform)
{
	switch (platform) {
	case VMMD_PLATFORM_PLAIN: return "plain";
	case VMMD_PLATFORM_SEV_ES: return "sev-es";
	case VMMD_PLATFORM_SEV_ES_EMU: return "sev-es-emu";
	default: return "unknown";
	}
}

__attribute__((noreturn)) void fw_halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt" ::: "memory");
}

__attribute__((weak)) void fw_ap_main(void)
{
	fw_halt_forever();
}

__attribute__((noreturn)) void fw_terminate(unsigned set, unsigned code)
{
	if (fw.platform == VMMD_PLATFORM_PLAIN) {
		/* no GHCB MSR on plain (KVM would #GP); fail through debug-exit */
		outb(fw.debug_exit_port, 0x7F);
		fw_halt_forever();
	}
	ghcb_msr_protocol(GHCB_MSR_TERM(set, code));
	fw_halt_forever();
}

__attribute__((noreturn)) void fw_exit(uint8_t code)
{
	if (fw_has_ghcb()) {
		ghcb_ioio_out(fw.debug_exit_port, 1, code);
		/* the VMM did not stop us: say so through the protocol */
		fw_terminate(GHCB_SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ);
	}
	if (fw.platform != VMMD_PLATFORM_SEV_ES)
		outb(fw.debug_exit_port, code);
	fw_halt_forever();
}

int fw_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	if (fw_has_ghcb())
		return ghcb_cpuid(leaf, sub, r);
	cpuid_insn(leaf, sub, r);
	return 0;
}

int fw_is_mapped(uint64_t gpa)
{
	uint64_t mask = 0x000FFFFFFFFFF000ull, entry, table;
	int level;

	if (fw.bi->c_bit)
		mask &= ~(1ull << fw.bi->c_bit);
	__asm__ volatile("mov %%cr3, %0" : "=r"(table));
	for (level = 3; level >= 0; level--) {
		entry = ((volatile uint64_t *)(table & mask))[(gpa >> (12 + 9 * level)) & 511];
		if (!(entry & 1))
			return 0;
		if (level == 0 || (level < 3 && (entry & 0x80)))
			return 1; /* 4 KiB page, or a 1 GiB / 2 MiB large page */
		table = entry;
	}
	return 0;
}

/* SEV_STATUS.ES -> hardware; "VmmdGhcbEmu\0" at CPUID 0x40000100 -> sev-es-emu */
static uint32_t probe_platform(void)
{
	static const char sig[12] = "VmmdGhcbEmu";
	uint32_t r[4];

	if (rdmsr(MSR_AMD64_SEV) & MSR_AMD64_SEV_ES_ENABLED)
		return VMMD_PLATFORM_SEV_ES;
	cpuid_insn(0x40000100, 0, r);
	if (memcmp(&r[1], sig, sizeof(sig)) == 0) {
		cpuid_insn(0x40000101, 0, r);
		if (r[0] != 0 && r[0] <= 0xFFFF) {
			fw.doorbell_port = (uint16_t)r[0];
			return VMMD_PLATFORM_SEV_ES_EMU;
		}
	}
	return VMMD_PLATFORM_PLAIN;
}

static void negotiate_ghcb(void)
{
	uint64_t resp = ghcb_msr_protocol(GHCB_MSR_SEV_INFO_REQ);
	unsigned max, min;

	if ((resp & GHCB_MSR_INFO_MASK) != GHCB_MSR_SEV_INFO_RESP)
		fw_terminate(GHCB_SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ);
	max = GHCB_MSR_PROTO_MAX(resp);
	min = GHCB_MSR_PROTO_MIN(resp);
	if (max < GHCB_PROTOCOL_MIN || min > GHCB_PROTOCOL_MAX || min > max)
		fw_terminate(GHCB_SEV_TERM_SET_GEN, GHCB_SEV_ES_PROT_UNSUPPORTED);
	fw.sev_info = resp;
	fw.ghcb_cbit = GHCB_MSR_CBIT(resp);
	fw.ghcb_version = max < GHCB_PROTOCOL_MAX ? max : GHCB_PROTOCOL_MAX;
}

void fw_entry(uint64_t cpu, const struct vmmd_bootinfo *bi)
{
	int ret;

	if (cpu != 0)
		fw_ap_main(); /* APs never touch the shared state in `fw` */
	fw.cpu = cpu;
	fw.bi = bi;
	fw.console_port = 0x3F8;
	fw.debug_exit_port = 0x501;
	fw.platform = probe_platform();

	if (bi->magic != VMMD_BOOTINFO_MAGIC || bi->version < 1) {
		if (fw.platform != VMMD_PLATFORM_PLAIN)
			fw_terminate(GHCB_SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ);
		fw_puts("fw: bad boot info magic/version\n");
		fw_exit(0x7E);
	}
	fw.console_port = bi->console_port;
	fw.debug_exit_port = bi->debug_exit_port;

	if (fw.platform != VMMD_PLATFORM_PLAIN) {
		if (bi->ghcb_gpa == 0 || (bi->ghcb_gpa & 0xFFF))
			fw_terminate(GHCB_SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ);
		fw.ghcb_gpa = bi->ghcb_gpa + cpu * 4096;
		fw.ghcb = (volatile uint8_t *)(uintptr_t)fw.ghcb_gpa;
		negotiate_ghcb();
		if (fw.platform == VMMD_PLATFORM_SEV_ES)
			fw_vc_install();
	}
	if (bi->platform != fw.platform)
		fw_printf("fw: warning: boot info says %s, probe found %s\n",
			  fw_platform_name(bi->platform), fw_platform_name(fw.platform));
	if (fw.platform == VMMD_PLATFORM_SEV_ES_EMU && bi->doorbell_port != fw.doorbell_port)
		fw_printf("fw: warning: doorbell %#x in boot info, %#x in CPUID\n",
			  bi->doorbell_port, fw.doorbell_port);

	ret = guest_main();
	fw_exit((uint8_t)ret);
}
