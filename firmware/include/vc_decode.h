/*
 * Decoding the instructions the #VC handler (lib/vc.c) emulates: a pure function
 * of the instruction bytes and RDX, so the host can test it (tests/unit/
 * test_firmware_vc_decode.py compiles lib/vc_decode.c for the host).
 * Encodings: Intel SDM vol. 2 IN / OUT / RDMSR / WRMSR; operand size as Linux
 * arch/x86/coco/sev/vc-shared.c vc_ioio_exitinfo() derives it (E4/E6/EC/EE one
 * byte, E5/E7/ED/EF four bytes, two with a 0x66 prefix).
 */
#ifndef VMMD_VC_DECODE_H
#define VMMD_VC_DECODE_H

#include <stdint.h>

enum fw_vc_kind { FW_VC_NONE = 0, FW_VC_OUT, FW_VC_IN, FW_VC_RDMSR, FW_VC_WRMSR, FW_VC_CPUID };

struct fw_vc_insn {
	enum fw_vc_kind kind;
	uint16_t port;   /* IN / OUT */
	uint8_t size;    /* IN / OUT: 1, 2 or 4 bytes */
	uint8_t length;  /* instruction bytes: how far RIP moves */
};

/* Fill *insn for the instruction at ip; FW_VC_NONE (and 0 returned) when it is not one the handler emulates
 * (string I/O, REP, other prefixes). `rdx` supplies the port of the DX forms. Reads at most 3 bytes. */
int fw_vc_decode(const uint8_t *ip, uint64_t rdx, struct fw_vc_insn *insn);

#endif
