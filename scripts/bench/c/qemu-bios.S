/*
 * qemu-bios (benchmark guest for QEMU in scripts/bench/exits.py): a 64 KiB
 * `-bios` image. The CPU starts in real mode at CS:IP = F000:FFF0 (base
 * 0xFFFF0000, the image's last 16 bytes), which jumps to offset 0:
 *   - with CONSOLE_BYTE set, write it and '\n' to the COM1 THR (0x3f8), the
 *     "first console byte" of the start-latency figure;
 *   - COUNT x `outb %al, $0x80` (QEMU's pc machine ignores port 0x80 writes);
 *   - write 0 to isa-debug-exit at DEBUG_EXIT_PORT (QEMU exits with status 1).
 * Real mode rather than long mode: the loop is one `out` and a `dec`/`jnz`
 * whichever mode runs it, and the exit cost is the same KVM_EXIT_IO.
 */
#ifndef COUNT
#define COUNT 0
#endif
#ifndef DEBUG_EXIT_PORT
#define DEBUG_EXIT_PORT 0xf4
#endif
	.code16
	.section .text
	.globl _start
_start:
	cli
#ifdef CONSOLE_BYTE
	movw	$0x3f8, %dx
	movb	$CONSOLE_BYTE, %al
	outb	%al, %dx
	movb	$'\n', %al
	outb	%al, %dx
#endif
	movl	$COUNT, %ecx
	xorb	%al, %al
	testl	%ecx, %ecx
	jz	2f
1:	outb	%al, $0x80
	decl	%ecx
	jnz	1b
2:	movw	$DEBUG_EXIT_PORT, %dx
	xorb	%al, %al
	outb	%al, %dx
3:	hlt
	jmp	3b

	.org	0xfff0
reset_vector:
	jmp	_start
	.org	0x10000

	.section .note.GNU-stack, "", @progbits
