/*
 * GHCB client: the MSR protocol and NAE events of the AMD GHCB specification
 * (pub. 56421), following Linux arch/x86/kernel/sev-shared.c
 * (sev_es_ghcb_hv_call(), __sev_cpuid_hv_msr(), vc_handle_ioio()) and
 * arch/x86/coco/sev/core.c (vc_handle_mmio(), vc_handle_msr()); the host side it
 * talks to is arch/x86/kvm/svm/sev.c sev_es_validate_vmgexit() on hardware and
 * vmmd/sev/vmgexit.py on sev-es-emu.
 *
 * Single-threaded: only vCPU 0 uses these, and never from inside the #VC
 * handler while a caller is between ghcb_begin() and ghcb_exit().
 */
#include "fw.h"

/* `rep vmmcall` is only ever reached on SEV-ES hardware: on the KVM hosts this
 * project runs on it hangs KVM_RUN forever. */
__attribute__((noinline)) void ghcb_vmgexit(void)
{
	if (fw.platform == VMMD_PLATFORM_SEV_ES)
		__asm__ volatile("rep; vmmcall" ::: "memory");
	else if (fw.platform == VMMD_PLATFORM_SEV_ES_EMU)
		__asm__ volatile("outb %%al, %%dx" : : "a"(0), "d"(fw.doorbell_port) : "memory");
}

/* What the GHCB MSR holds as far as this vCPU knows: the host only changes it when it
 * answers an MSR-protocol request, and we read that answer back. Skipping the
 * rewrite of an unchanged GHCB GPA saves a VM exit per NAE event on sev-es-emu,
 * where WRMSR of the GHCB MSR traps to the VMM. (Linux rewrites it before every
 * VMGEXIT instead.) Invariants this rests on: every write of the GHCB MSR goes
 * through ghcb_write_msr(), and nothing between ghcb_begin() and the return of
 * ghcb_exit() can raise #VC (only the GHCB MSR, XGETBV and a CR4 read run there,
 * none intercepted for SEV-ES) - there is one GHCB and no backup, so a nested
 * #VC would overwrite the event in flight. */
static uint64_t ghcb_msr_value;

void ghcb_write_msr(uint64_t value)
{
	wrmsr(MSR_AMD64_SEV_ES_GHCB, value);
	ghcb_msr_value = value;
}

uint64_t ghcb_msr_protocol(uint64_t request)
{
	ghcb_write_msr(request);
	ghcb_vmgexit();
	ghcb_msr_value = rdmsr(MSR_AMD64_SEV_ES_GHCB);
	return ghcb_msr_value;
}

int ghcb_msr_cpuid(uint32_t leaf, unsigned reg, uint32_t *value)
{
	uint64_t resp = ghcb_msr_protocol(GHCB_MSR_CPUID(leaf, reg & 3));

	if ((resp & GHCB_MSR_INFO_MASK) != GHCB_MSR_CPUID_RESP)
		return -1;
	*value = (uint32_t)(resp >> 32); /* GHCBData[63:32] */
	return 0;
}

void ghcb_begin(void)
{
	ghcb_put(GHCB_OFF_VALID_BITMAP, 0);
	ghcb_put(GHCB_OFF_VALID_BITMAP + 8, 0);
	*(volatile uint16_t *)(fw.ghcb + GHCB_OFF_PROTOCOL_VER) = fw.ghcb_version;
	*(volatile uint32_t *)(fw.ghcb + GHCB_OFF_USAGE) = 0;
}

void ghcb_set(unsigned off, uint64_t value)
{
	ghcb_put(off, value);
	fw.ghcb[GHCB_OFF_VALID_BITMAP + off / 64] |= (uint8_t)(1u << ((off / 8) % 8));
}

uint32_t ghcb_exit(uint64_t exit_code, uint64_t info1, uint64_t info2)
{
	ghcb_set(GHCB_OFF_SW_EXIT_CODE, exit_code);
	ghcb_set(GHCB_OFF_SW_EXIT_INFO_1, info1);
	ghcb_set(GHCB_OFF_SW_EXIT_INFO_2, info2);
	if (ghcb_msr_value != fw.ghcb_gpa)
		ghcb_write_msr(fw.ghcb_gpa);
	ghcb_vmgexit();
	return (uint32_t)ghcb_get(GHCB_OFF_SW_EXIT_INFO_1);
}

uint32_t ghcb_call(uint64_t exit_code, uint64_t info1, uint64_t info2)
{
	ghcb_begin();
	return ghcb_exit(exit_code, info1, info2);
}

int ghcb_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	uint32_t ret;
	uint64_t cr4;

	ghcb_begin();
	ghcb_set(GHCB_OFF_RAX, leaf);
	ghcb_set(GHCB_OFF_RCX, sub);
	if (leaf == 0xD) {
		uint64_t xcr0 = 1; /* x87 only, unless the OS enabled XSAVE (Linux vc_handle_cpuid()) */

		__asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
		if (cr4 & (1u << 18)) { /* CR4.OSXSAVE */
			uint32_t lo, hi;

			__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
			xcr0 = ((uint64_t)hi << 32) | lo;
		}
		ghcb_set(GHCB_OFF_XCR0, xcr0);
	}
	ret = ghcb_exit(SVM_EXIT_CPUID, 0, 0);
	if (ret == GHCB_RESULT_OK &&
	    !(ghcb_is_valid(GHCB_OFF_RAX) && ghcb_is_valid(GHCB_OFF_RBX) &&
	      ghcb_is_valid(GHCB_OFF_RCX) && ghcb_is_valid(GHCB_OFF_RDX)))
		ret = GHCB_RESULT_NO_OUTPUT;
	if (ret != GHCB_RESULT_OK) {
		r[0] = r[1] = r[2] = r[3] = 0;
		return (int)ret;
	}
	r[0] = (uint32_t)ghcb_get(GHCB_OFF_RAX);
	r[1] = (uint32_t)ghcb_get(GHCB_OFF_RBX);
	r[2] = (uint32_t)ghcb_get(GHCB_OFF_RCX);
	r[3] = (uint32_t)ghcb_get(GHCB_OFF_RDX);
	return 0;
}

uint32_t ghcb_ioio_info(uint16_t port, unsigned size, int in, int string)
{
	uint32_t info = ((uint32_t)port << IOIO_PORT_SHIFT) | IOIO_ADDR_64;

	info |= size == 4 ? IOIO_DATA_32 : size == 2 ? IOIO_DATA_16 : IOIO_DATA_8;
	if (in)
		info |= IOIO_TYPE_IN;
	if (string)
		info |= IOIO_TYPE_STR | IOIO_REP;
	return info;
}

static uint64_t size_mask(unsigned size)
{
	return size >= 8 ? ~0ull : (1ull << (8 * size)) - 1;
}

int ghcb_ioio_out(uint16_t port, unsigned size, uint32_t value)
{
	ghcb_begin();
	ghcb_set(GHCB_OFF_RAX, value & size_mask(size));
	return (int)ghcb_exit(SVM_EXIT_IOIO, ghcb_ioio_info(port, size, 0, 0), 0);
}

int ghcb_ioio_in(uint16_t port, unsigned size, uint32_t *value)
{
	uint32_t ret;

	ghcb_begin();
	ghcb_set(GHCB_OFF_RAX, 0);
	ret = ghcb_exit(SVM_EXIT_IOIO, ghcb_ioio_info(port, size, 1, 0), 0);
	if (ret == GHCB_RESULT_OK && !ghcb_is_valid(GHCB_OFF_RAX))
		ret = GHCB_RESULT_NO_OUTPUT;
	*value = ret == GHCB_RESULT_OK ? (uint32_t)(ghcb_get(GHCB_OFF_RAX) & size_mask(size)) : 0;
	return (int)ret;
}

int ghcb_ioio_outs(uint16_t port, unsigned size, const void *buf, unsigned count)
{
	if ((uint64_t)size * count > GHCB_SHARED_BUFFER_SIZE)
		return GHCB_RESULT_ERROR;
	ghcb_begin();
	memcpy((void *)(fw.ghcb + GHCB_OFF_SHARED_BUFFER), buf, size * count);
	ghcb_set(GHCB_OFF_SW_SCRATCH, ghcb_shared_gpa());
	return (int)ghcb_exit(SVM_EXIT_IOIO, ghcb_ioio_info(port, size, 0, 1), count);
}

int ghcb_ioio_ins(uint16_t port, unsigned size, void *buf, unsigned count)
{
	uint32_t ret;

	if ((uint64_t)size * count > GHCB_SHARED_BUFFER_SIZE)
		return GHCB_RESULT_ERROR;
	ghcb_begin();
	ghcb_set(GHCB_OFF_SW_SCRATCH, ghcb_shared_gpa());
	ret = ghcb_exit(SVM_EXIT_IOIO, ghcb_ioio_info(port, size, 1, 1), count);
	if (ret == GHCB_RESULT_OK)
		memcpy(buf, (const void *)(fw.ghcb + GHCB_OFF_SHARED_BUFFER), size * count);
	return (int)ret;
}

int ghcb_rdmsr(uint32_t msr, uint64_t *value)
{
	uint32_t ret;

	ghcb_begin();
	ghcb_set(GHCB_OFF_RCX, msr);
	ret = ghcb_exit(SVM_EXIT_MSR, 0, 0);
	if (ret == GHCB_RESULT_OK && !(ghcb_is_valid(GHCB_OFF_RAX) && ghcb_is_valid(GHCB_OFF_RDX)))
		ret = GHCB_RESULT_NO_OUTPUT;
	*value = ret == GHCB_RESULT_OK ?
		 (ghcb_get(GHCB_OFF_RDX) << 32) | (uint32_t)ghcb_get(GHCB_OFF_RAX) : 0;
	return (int)ret;
}

int ghcb_wrmsr(uint32_t msr, uint64_t value)
{
	ghcb_begin();
	ghcb_set(GHCB_OFF_RCX, msr);
	ghcb_set(GHCB_OFF_RAX, (uint32_t)value);
	ghcb_set(GHCB_OFF_RDX, value >> 32);
	return (int)ghcb_exit(SVM_EXIT_MSR, 1, 0);
}

int ghcb_mmio_read(uint64_t gpa, void *buf, unsigned len)
{
	uint32_t ret;

	if (len == 0 || len > 8)  /* one access; ghcb_mmio_read16() shows the VMM's fragmenting */
		return GHCB_RESULT_ERROR;
	ghcb_begin();
	ghcb_set(GHCB_OFF_SW_SCRATCH, ghcb_shared_gpa());
	ret = ghcb_exit(SVM_VMGEXIT_MMIO_READ, gpa, len);
	if (ret == GHCB_RESULT_OK)
		memcpy(buf, (const void *)(fw.ghcb + GHCB_OFF_SHARED_BUFFER), len);
	return (int)ret;
}

int ghcb_mmio_write(uint64_t gpa, const void *buf, unsigned len)
{
	if (len == 0 || len > 8)
		return GHCB_RESULT_ERROR;
	ghcb_begin();
	memcpy((void *)(fw.ghcb + GHCB_OFF_SHARED_BUFFER), buf, len);
	ghcb_set(GHCB_OFF_SW_SCRATCH, ghcb_shared_gpa());
	return (int)ghcb_exit(SVM_VMGEXIT_MMIO_WRITE, gpa, len);
}

int ghcb_nmi_complete(void)
{
	return (int)ghcb_call(SVM_VMGEXIT_NMI_COMPLETE, 0, 0);
}

int ghcb_ap_jump_table_set(uint64_t address)
{
	return (int)ghcb_call(SVM_VMGEXIT_AP_JUMP_TABLE, SVM_VMGEXIT_SET_AP_JUMP_TABLE, address);
}

int ghcb_ap_jump_table_get(uint64_t *address)
{
	uint32_t ret = ghcb_call(SVM_VMGEXIT_AP_JUMP_TABLE, SVM_VMGEXIT_GET_AP_JUMP_TABLE, 0);

	*address = ret == GHCB_RESULT_OK ? ghcb_info2() : 0;
	return (int)ret;
}

int ghcb_hv_features(uint64_t *features)
{
	uint32_t ret = ghcb_call(SVM_VMGEXIT_HV_FEATURES, 0, 0);

	*features = ret == GHCB_RESULT_OK ? ghcb_info2() : 0;
	return (int)ret;
}

int ghcb_terminate_event(unsigned set, unsigned code)
{
	return (int)ghcb_call(SVM_VMGEXIT_TERM_REQUEST, (set & 0xF) | ((code & 0xFF) << 4), 0);
}
