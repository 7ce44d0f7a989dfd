/*
 * port-loop (benchmark guest for scripts/bench/exits.py): the vmmd flat 64-bit
 * entry contract (firmware/include/bootinfo.h: long mode, RSI = boot-info GPA),
 * guest_arg = (port << 32) | count: `count` x `outb %al, port`, then a write of
 * 0 to the boot info's debug-exit port (a clean end, status 1) and hlt.
 * Built by the bench with BI_GUEST_ARG / BI_DEBUG_EXIT_PORT set to the field
 * offsets of struct vmmd_bootinfo (read from vmmd/machine/bootinfo.py, which
 * tests/test_layout.py checks against the header), so nothing is hard-coded.
 */
	.code64
	.section .text
	.globl _start
_start:
	movq	BI_GUEST_ARG(%rsi), %rax
	movl	%eax, %ecx		/* count */
	shrq	$32, %rax
	movl	%eax, %edx		/* port */
	xorl	%eax, %eax
	testl	%ecx, %ecx
	jz	2f
1:	outb	%al, %dx
	decl	%ecx
	jnz	1b
2:	movzwl	BI_DEBUG_EXIT_PORT(%rsi), %edx
	xorl	%eax, %eax
	outb	%al, %dx
3:	cli
	hlt
	jmp	3b

	.section .note.GNU-stack, "", @progbits
