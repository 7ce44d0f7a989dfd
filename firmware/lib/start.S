/*
 * Entry point of every vmmd test guest. The VMM starts us (firmware/include/
 * bootinfo.h) in 64-bit mode on its identity map with RSI = boot-info GPA,
 * RDI = vCPU index, RSP = top of this vCPU's stack, IF = 0, no IDT.
 * `_start` is the first byte of the image (link.ld keeps .text.start first).
 */
	.section .text.start, "ax"
	.code64
	.globl _start
_start:
	cld
	andq	$-16, %rsp		/* SysV ABI: 16-byte aligned before the call */
	/* fw_entry(uint64_t cpu = RDI, const struct vmmd_bootinfo *bi = RSI) */
	call	fw_entry
1:	cli
	hlt
	jmp	1b

/*
 * #VC (vector 29) entry for SEV-ES hardware (see lib/vc.c). The CPU pushed
 * SS, RSP, RFLAGS, CS, RIP and the error code (= SVM exit code) on a 16-byte
 * aligned stack; we push the 15 GPRs into a struct fw_vc_frame, call
 * fw_vc_handle(frame) and return with iretq.
 */
	.text
	.globl fw_vc_entry
fw_vc_entry:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, %rdi		/* struct fw_vc_frame * */
	subq	$8, %rsp		/* 6 + 15 qwords pushed: realign to 16 */
	cld
	call	fw_vc_handle
	addq	$8, %rsp
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$8, %rsp		/* error code */
	iretq

	.section .note.GNU-stack, "", @progbits
