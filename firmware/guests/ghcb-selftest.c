/*
 * ghcb-selftest: TAP (https://testanything.org) over the serial console,
 * one line per GHCB protocol check. Every description is unique and stable:
 * tests/ on the host match them line by line. Expected results follow what
 * Linux arch/x86/kvm/svm/sev.c does for the same input (sev_es_validate_vmgexit(),
 * setup_vmgexit_scratch(), sev_handle_vmgexit_msr_protocol()).
 */
#include "fw.h"

#define SCR_OFFSET    7     /* 16550 scratch register */
#define UNMAPPED_PORT 0x80  /* nothing decodes it: OUT dropped, IN all ones */
#define MSR_IA32_PAT  0x277u /* kept by KVM in software; TSC_AUX is not (V_TSC_AUX hosts drop writes) */
#define PAT_TEST      0x0006040600070405ull /* every byte a valid memory type (kvm_pat_valid()) */
#define MSR_UNKNOWN   0x4b564dffu /* in KVM's PV range, never implemented: #GP */
#define X86_TRAP_GP   13

static char detail[96];
#define DETAIL(...) fw_snprintf(detail, sizeof(detail), __VA_ARGS__)

static uint16_t scr_port(void) { return (uint16_t)(fw.console_port + SCR_OFFSET); }

/* the result/info2 pair of the last event, for details */
static int want_ok(int ret)
{
	if (ret != GHCB_RESULT_OK)
		DETAIL("result %d, exit_info_2 %#lx", ret, ghcb_info2());
	return ret == GHCB_RESULT_OK;
}

static int want_error(uint32_t ret, uint64_t err1, uint64_t err2)
{
	uint64_t info2 = ghcb_info2();

	if (ret == GHCB_RESULT_ERROR && (info2 == err1 || info2 == err2))
		return 1;
	DETAIL("result %u, exit_info_2 %#lx, want 2 / %lu", ret, info2, err1);
	return 0;
}

static unsigned first_diff(const uint8_t *a, const uint8_t *b, unsigned n)
{
	unsigned i;

	for (i = 0; i < n && a[i] == b[i]; i++)
		;
	return i;
}

static int ghcb_mmio_write16(uint64_t gpa, const uint8_t *data)
{
	ghcb_begin();
	memcpy((void *)(fw.ghcb + GHCB_OFF_SHARED_BUFFER), data, 16);
	ghcb_set(GHCB_OFF_SW_SCRATCH, ghcb_shared_gpa());
	return (int)ghcb_exit(SVM_VMGEXIT_MMIO_WRITE, gpa, 16);
}

static int ghcb_mmio_read16(uint64_t gpa, uint8_t *data)
{
	uint32_t ret;

	ghcb_begin();
	ghcb_set(GHCB_OFF_SW_SCRATCH, ghcb_shared_gpa());
	ret = ghcb_exit(SVM_VMGEXIT_MMIO_READ, gpa, 16);
	if (ret == GHCB_RESULT_OK)
		memcpy(data, (const void *)(fw.ghcb + GHCB_OFF_SHARED_BUFFER), 16);
	return (int)ret;
}

static int t_msr_sev_info(void)
{
	uint64_t v = ghcb_msr_protocol(GHCB_MSR_SEV_INFO_REQ);

	if ((v & GHCB_MSR_INFO_MASK) == GHCB_MSR_SEV_INFO_RESP && GHCB_MSR_PROTO_MIN(v) <= GHCB_MSR_PROTO_MAX(v) &&
	    GHCB_MSR_PROTO_MAX(v) >= GHCB_PROTOCOL_MIN && GHCB_MSR_PROTO_MIN(v) <= GHCB_PROTOCOL_MAX)
		return 1;
	DETAIL("GHCB MSR %#lx", v);
	return 0;
}

static int t_msr_cpuid(void)
{
	uint32_t r[4], v;
	unsigned reg;
	int ret = ghcb_cpuid(0, 0, r);

	if (!want_ok(ret))
		return 0;
	for (reg = 0; reg < 4; reg++) {
		if (ghcb_msr_cpuid(0, reg, &v)) {
			DETAIL("register %u: GHCB MSR %#lx", reg, rdmsr(MSR_AMD64_SEV_ES_GHCB));
			return 0;
		}
		if (v != r[reg]) {
			DETAIL("register %u: MSR protocol %#x, GHCB %#x", reg, v, r[reg]);
			return 0;
		}
	}
	return 1;
}

static int t_cpuid_0(void)
{
	uint32_t r[4];
	int ret = ghcb_cpuid(0, 0, r);

	if (ret == GHCB_RESULT_NO_OUTPUT) {
		DETAIL("RAX/RBX/RCX/RDX not all marked valid");
		return 0;
	}
	if (!want_ok(ret))
		return 0;
	if (r[0] == 0 || (r[1] | r[2] | r[3]) == 0) {
		DETAIL("max leaf %#x, vendor registers %#x %#x %#x", r[0], r[1], r[3], r[2]);
		return 0;
	}
	return 1;
}

static int t_cpuid_d(void)
{
	uint32_t r[4], l1[4];
	int ret = ghcb_cpuid(0xD, 0, r);

	if (!want_ok(ret) || !want_ok(ghcb_cpuid(1, 0, l1)))
		return 0;
	/* with XSAVE (CPUID.1:ECX[26]) x87 state (bit 0) is always supported */
	if ((l1[2] & (1u << 26)) && !(r[0] & 1)) {
		DETAIL("XSAVE set but leaf 0xD EAX %#x", r[0]);
		return 0;
	}
	return 1;
}

static int t_ioio_8(void)
{
	uint32_t v = 0;

	if (!want_ok(ghcb_ioio_out(scr_port(), 1, 0x5A)) || !want_ok(ghcb_ioio_in(scr_port(), 1, &v)))
		return 0;
	if (v != 0x5A) {
		DETAIL("SCR read %#x, wrote 0x5a", v);
		return 0;
	}
	return 1;
}

static int t_out(unsigned size)
{
	return want_ok(ghcb_ioio_out(UNMAPPED_PORT, size, size == 2 ? 0xBEEF : 0xDEADBEEF));
}

static int t_in(unsigned size)
{
	uint32_t v = 0, want = size == 2 ? 0xFFFF : 0xFFFFFFFF;

	if (!want_ok(ghcb_ioio_in(UNMAPPED_PORT, size, &v)))
		return 0;
	if (v != want) {
		DETAIL("read %#x, want %#x", v, want);
		return 0;
	}
	return 1;
}

static int t_outs(void)
{
	uint32_t v = 0;

	if (!want_ok(ghcb_ioio_outs(scr_port(), 1, "ab", 2)) || !want_ok(ghcb_ioio_in(scr_port(), 1, &v)))
		return 0;
	if (v != 'b') {
		DETAIL("SCR holds %#x after outs \"ab\", want 0x62", v);
		return 0;
	}
	return 1;
}

static int t_ins(void)
{
	uint8_t buf[2] = { 0, 0 };

	if (!want_ok(ghcb_ioio_out(scr_port(), 1, 0xC3)) || !want_ok(ghcb_ioio_ins(scr_port(), 1, buf, 2)))
		return 0;
	if (buf[0] != 0xC3 || buf[1] != 0xC3) {
		DETAIL("ins read %#x %#x, want 0xc3 0xc3", buf[0], buf[1]);
		return 0;
	}
	return 1;
}

static int t_msr_rw(void)
{
	uint64_t before = 0, v = 0;
	int ok;

	if (!want_ok(ghcb_rdmsr(MSR_IA32_PAT, &before)))
		return 0;
	ok = want_ok(ghcb_wrmsr(MSR_IA32_PAT, PAT_TEST)) && want_ok(ghcb_rdmsr(MSR_IA32_PAT, &v));
	if (ok && v != PAT_TEST) {
		DETAIL("PAT read %#lx, wrote %#llx", v, PAT_TEST);
		ok = 0;
	}
	ghcb_wrmsr(MSR_IA32_PAT, before);
	return ok;
}

static int t_msr_gp(void)
{
	uint64_t v;
	int ret = ghcb_rdmsr(MSR_UNKNOWN, &v);

	if (ret == GHCB_RESULT_EXCEPTION && (ghcb_info2() & 0xFF) == X86_TRAP_GP)
		return 1;
	DETAIL("result %d, exit_info_2 %#lx, want 1 / vector 13", ret, ghcb_info2());
	return 0;
}

static int t_mmio(unsigned len)
{
	static const uint64_t pattern = 0x8877665544332211ull;
	uint64_t gpa = fw.bi->mmio_testdev_gpa + 0x100 + 8 * len, got = 0, want;

	want = len == 8 ? pattern : pattern & ((1ull << (8 * len)) - 1);
	if (!want_ok(ghcb_mmio_write(gpa, &pattern, len)) || !want_ok(ghcb_mmio_read(gpa, &got, len)))
		return 0;
	if (got != want) {
		DETAIL("read %#lx, wrote %#lx", got, want);
		return 0;
	}
	return 1;
}

static int t_nmi_complete(void)
{
	return want_ok(ghcb_nmi_complete());
}

static int t_ap_jump_table(void)
{
	uint64_t addr = 0;

	if (!want_ok(ghcb_ap_jump_table_set(0x9F000)) || !want_ok(ghcb_ap_jump_table_get(&addr)))
		return 0;
	if (addr != 0x9F000) {
		DETAIL("get returned %#lx, set 0x9f000", addr);
		return 0;
	}
	return 1;
}

static int t_hv_features(void)
{
	uint64_t f;

	return want_ok(ghcb_hv_features(&f));
}

static int t_err_missing(void)
{
	ghcb_begin();
	ghcb_set(GHCB_OFF_RAX, 0);
	ghcb_put(GHCB_OFF_RCX, 0); /* value present, valid bit not set */
	return want_error(ghcb_exit(SVM_EXIT_CPUID, 0, 0), GHCB_ERR_MISSING_INPUT, GHCB_ERR_MISSING_INPUT);
}

static int t_err_usage(void)
{
	ghcb_begin();
	*(volatile uint32_t *)(fw.ghcb + GHCB_OFF_USAGE) = 1;
	ghcb_set(GHCB_OFF_RAX, 0);
	ghcb_set(GHCB_OFF_RCX, 0);
	return want_error(ghcb_exit(SVM_EXIT_CPUID, 0, 0), GHCB_ERR_INVALID_USAGE, GHCB_ERR_INVALID_USAGE);
}

static int t_err_scratch(void)
{
	ghcb_begin();
	/* inside the GHCB page but before the shared buffer */
	ghcb_set(GHCB_OFF_SW_SCRATCH, fw.ghcb_gpa + 0x100);
	return want_error(ghcb_exit(SVM_EXIT_IOIO, ghcb_ioio_info(scr_port(), 1, 0, 1), 1),
			  GHCB_ERR_INVALID_SCRATCH_AREA, GHCB_ERR_INVALID_SCRATCH_AREA);
}

static int t_err_event(void)
{
	return want_error(ghcb_call(0x12345, 0, 0), GHCB_ERR_INVALID_EVENT, GHCB_ERR_INVALID_EVENT);
}

/* KVM does not limit the MMIO length (sev.c passes exit_info_2 to
 * kvm_sev_es_mmio_read/write(), which split it into 8-byte KVM_EXIT_MMIO
 * fragments); only the scratch area bounds it. */
static int t_mmio16(void)
{
	static const uint8_t pattern[16] = "0123456789abcdef";
	uint64_t gpa = fw.bi->mmio_testdev_gpa + 0x200;
	uint8_t got[16];

	memset(got, 0, sizeof(got));
	if (!want_ok(ghcb_mmio_write16(gpa, pattern)) || !want_ok(ghcb_mmio_read16(gpa, got)))
		return 0;
	if (memcmp(got, pattern, 16)) {
		DETAIL("read back differs at byte %u", first_diff(got, pattern, 16));
		return 0;
	}
	return 1;
}

static int t_err_mmio_len(void)
{
	/* scratch = start of the shared buffer, length runs past its end (0xFF0) */
	ghcb_begin();
	ghcb_set(GHCB_OFF_SW_SCRATCH, ghcb_shared_gpa());
	return want_error(ghcb_exit(SVM_VMGEXIT_MMIO_READ, fw.bi->mmio_testdev_gpa, GHCB_SHARED_BUFFER_SIZE + 8),
			  GHCB_ERR_INVALID_SCRATCH_AREA, GHCB_ERR_INVALID_SCRATCH_AREA);
}

static int t_msr_unknown(void)
{
	uint64_t v = ghcb_msr_protocol(0xFFF);

	if (v == 0xFFF)
		return 1;
	DETAIL("GHCB MSR %#lx after request 0xfff", v);
	return 0;
}

static int t_after_errors(void)
{
	uint32_t r[4];

	return want_ok(ghcb_cpuid(0, 0, r));
}

static int t_out16(void) { return t_out(2); }
static int t_out32(void) { return t_out(4); }
static int t_in16(void) { return t_in(2); }
static int t_in32(void) { return t_in(4); }
static int t_mmio1(void) { return t_mmio(1); }
static int t_mmio2(void) { return t_mmio(2); }
static int t_mmio4(void) { return t_mmio(4); }
static int t_mmio8(void) { return t_mmio(8); }

static const struct test {
	int (*fn)(void);
	const char *desc;
} tests[] = {
	{ t_msr_sev_info, "msr-protocol sev-info response" },
	{ t_msr_cpuid, "msr-protocol cpuid leaf 0 matches ghcb cpuid" },
	{ t_cpuid_0, "ghcb cpuid leaf 0" },
	{ t_cpuid_d, "ghcb cpuid leaf 0xd subleaf 0 with xcr0" },
	{ t_ioio_8, "ioio out8 then in8 scratch register" },
	{ t_out16, "ioio out16 unmapped port" },
	{ t_out32, "ioio out32 unmapped port" },
	{ t_in16, "ioio in16 unmapped port reads 0xffff" },
	{ t_in32, "ioio in32 unmapped port reads 0xffffffff" },
	{ t_outs, "ioio rep outsb to scratch register" },
	{ t_ins, "ioio rep insb from scratch register" },
	{ t_msr_rw, "msr write then read pat" },
	{ t_msr_gp, "msr read of unknown msr injects gp" },
	{ t_mmio1, "mmio write then read 1 byte" },
	{ t_mmio2, "mmio write then read 2 bytes" },
	{ t_mmio4, "mmio write then read 4 bytes" },
	{ t_mmio8, "mmio write then read 8 bytes" },
	{ t_mmio16, "mmio write then read 16 bytes in 8-byte fragments" },
	{ t_nmi_complete, "nmi complete" },
	{ t_ap_jump_table, "ap jump table set then get" },
	{ t_hv_features, "hv features" },
	{ t_err_missing, "error missing rcx valid bit" },
	{ t_err_usage, "error nonzero ghcb usage" },
	{ t_err_scratch, "error scratch outside shared buffer" },
	{ t_err_event, "error unknown exit code 0x12345" },
	{ t_err_mmio_len, "error mmio length past the shared buffer" },
	{ t_msr_unknown, "msr-protocol unknown request 0xfff left as is" },
	{ t_after_errors, "ghcb cpuid works after the error paths" },
};

int guest_main(void)
{
	unsigned i, n = sizeof(tests) / sizeof(tests[0]), failed = 0;

	if (!fw_has_ghcb()) {
		fw_printf("1..0 # SKIP no GHCB on %s\n", fw_platform_name(fw.platform));
		return 0;
	}
	fw_printf("1..%u\n", n);
	for (i = 0; i < n; i++) {
		detail[0] = '\0';
		if (tests[i].fn()) {
			fw_printf("ok %u - %s\n", i + 1, tests[i].desc);
		} else {
			failed++;
			fw_printf("not ok %u - %s # %s\n", i + 1, tests[i].desc, detail[0] ? detail : "failed");
		}
	}
	fw_printf("# done\n");
	return 0; /* failures are in the TAP stream; the VM still ends cleanly */
}
