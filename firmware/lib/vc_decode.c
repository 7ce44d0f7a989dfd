/* See include/vc_decode.h. No dependency beyond <stdint.h>: built into the guests and, for tests, for the host. */
#include "vc_decode.h"

int fw_vc_decode(const uint8_t *ip, uint64_t rdx, struct fw_vc_insn *insn)
{
	unsigned prefix = 0;
	uint8_t op;

	insn->kind = FW_VC_NONE;
	insn->port = 0;
	insn->size = 0;
	insn->length = 0;
	if (ip[0] == 0x0F) {
		switch (ip[1]) {
		case 0xA2: insn->kind = FW_VC_CPUID; break;
		case 0x30: insn->kind = FW_VC_WRMSR; break;
		case 0x32: insn->kind = FW_VC_RDMSR; break;
		default: return 0;
		}
		insn->length = 2;
		return 1;
	}
	if (ip[0] == 0x66)
		prefix = 1;
	op = ip[prefix];
	switch (op) {
	case 0xE4: case 0xE5: case 0xE6: case 0xE7: /* imm8 port */
		insn->port = ip[prefix + 1];
		insn->length = (uint8_t)(prefix + 2);
		break;
	case 0xEC: case 0xED: case 0xEE: case 0xEF: /* port in DX */
		insn->port = (uint16_t)rdx;
		insn->length = (uint8_t)(prefix + 1);
		break;
	default:
		return 0;
	}
	insn->kind = (op & 0x02) ? FW_VC_OUT : FW_VC_IN; /* E6/E7/EE/EF are OUT */
	if (!(op & 0x01))
		insn->size = 1; /* AL forms ignore the operand-size prefix */
	else
		insn->size = prefix ? 2 : 4;
	return 1;
}
