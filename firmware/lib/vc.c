/*
 * #VC (vector 29) handler for SEV-ES hardware, modelled on Linux
 * arch/x86/coco/sev/core.c vc_handle_exitcode() but much smaller: it handles
 * CPUID (0F A2), RDMSR / WRMSR (0F 32 / 0F 30) and port I/O without string or
 * REP forms (E4-E7, EC-EF, 8/16/32-bit; include/vc_decode.h) by issuing the
 * matching GHCB event and stepping RIP over the instruction. Anything else, and
 * an exception the host asks to inject, ends the guest with a GHCB MSR-protocol
 * termination request.
 *
 * Installed only when the probe found SEV-ES hardware; it cannot run on the
 * hosts this project is developed on (no SEV-ES there). The library itself never
 * executes an intercepted instruction on hardware (it uses the GHCB directly),
 * so a #VC never interrupts a GHCB event in progress: this is the path for guest
 * code that uses plain `cpuid` / `outb` (demo, exit-loop).
 */
#include "fw.h"
#include "vc_decode.h"

#define VC_VECTOR 29

struct fw_vc_frame { /* lib/start.S fw_vc_entry pushes */
	uint64_t r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	uint64_t error_code; /* SVM exit code */
	uint64_t rip, cs, rflags, rsp, ss;
};

struct idt_gate {
	uint16_t offset_lo;
	uint16_t selector;
	uint8_t ist;
	uint8_t type_attr; /* 0x8E: present, DPL 0, 64-bit interrupt gate */
	uint16_t offset_mid;
	uint32_t offset_hi;
	uint32_t reserved;
};

static struct idt_gate idt[VC_VECTOR + 1] __attribute__((aligned(16)));

void fw_vc_entry(void);
void fw_vc_handle(struct fw_vc_frame *f);

void fw_vc_install(void)
{
	uint64_t handler = (uint64_t)(uintptr_t)fw_vc_entry;
	uint16_t cs;
	struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr;

	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	idt[VC_VECTOR].offset_lo = (uint16_t)handler;
	idt[VC_VECTOR].selector = cs;
	idt[VC_VECTOR].type_attr = 0x8E;
	idt[VC_VECTOR].offset_mid = (uint16_t)(handler >> 16);
	idt[VC_VECTOR].offset_hi = (uint32_t)(handler >> 32);
	idtr.limit = sizeof(idt) - 1; /* vectors 0..28 are not present: they still end in a triple fault */
	idtr.base = (uint64_t)(uintptr_t)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}

void fw_vc_handle(struct fw_vc_frame *f)
{
	struct fw_vc_insn insn;
	uint32_t r[4], v;
	uint64_t value;

	if (!fw_vc_decode((const uint8_t *)(uintptr_t)f->rip, f->rdx, &insn))
		goto fail;
	switch (insn.kind) {
	case FW_VC_CPUID:
		if (f->error_code != SVM_EXIT_CPUID || ghcb_cpuid((uint32_t)f->rax, (uint32_t)f->rcx, r) != GHCB_RESULT_OK)
			goto fail;
		f->rax = r[0];
		f->rbx = r[1];
		f->rcx = r[2];
		f->rdx = r[3];
		break;
	case FW_VC_OUT:
		if (f->error_code != SVM_EXIT_IOIO || ghcb_ioio_out(insn.port, insn.size, (uint32_t)f->rax))
			goto fail;
		break;
	case FW_VC_IN:
		if (f->error_code != SVM_EXIT_IOIO || ghcb_ioio_in(insn.port, insn.size, &v))
			goto fail;
		if (insn.size == 4)
			f->rax = v; /* a 32-bit destination zero-extends into RAX */
		else if (insn.size == 2)
			f->rax = (f->rax & ~0xFFFFull) | (v & 0xFFFF);
		else
			f->rax = (f->rax & ~0xFFull) | (v & 0xFF);
		break;
	case FW_VC_RDMSR:
		if (f->error_code != SVM_EXIT_MSR || ghcb_rdmsr((uint32_t)f->rcx, &value))
			goto fail;
		f->rax = (uint32_t)value;
		f->rdx = value >> 32;
		break;
	case FW_VC_WRMSR:
		if (f->error_code != SVM_EXIT_MSR ||
		    ghcb_wrmsr((uint32_t)f->rcx, (f->rdx << 32) | (uint32_t)f->rax))
			goto fail;
		break;
	default:
		goto fail;
	}
	f->rip += insn.length;
	return;
fail: /* not emulated here, or the host asked to inject an exception (#GP) this handler cannot deliver */
	fw_terminate(GHCB_SEV_TERM_SET_GEN, GHCB_SEV_ES_GEN_REQ);
}
