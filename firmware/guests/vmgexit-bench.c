/* vmgexit-bench (benchmark, GHCB platforms): guest_arg = (mode << 32) | count.
 *   mode 0: `count` bare VMGEXITs with the GHCB MSR holding an MSR-protocol
 *           SEV_INFO request written once before the loop (after the first the
 *           MSR holds the response, which the VMM leaves as it is)
 *   mode 1: `count` GHCB CPUID events (leaf 0)
 *   mode 2: `count` GHCB IOIO OUT events (8-bit, port 0x80)
 *   mode 3: `count` MSR-protocol SEV_INFO round trips (GHCB MSR write + VMGEXIT)
 * No printing inside the loops; a failed event ends the run with status 1. */
#include "fw.h"

int guest_main(void)
{
	uint64_t arg = fw.bi->guest_arg, n = arg & 0xFFFFFFFF;
	unsigned mode = (unsigned)(arg >> 32);
	uint32_t r[4];

	if (!fw_has_ghcb()) {
		fw_printf("vmgexit-bench: no GHCB on %s\n", fw_platform_name(fw.platform));
		return 2;
	}
	switch (mode) {
	case 0:
		ghcb_write_msr(GHCB_MSR_SEV_INFO_REQ);
		while (n--)
			ghcb_vmgexit();
		break;
	case 1:
		while (n--)
			if (ghcb_cpuid(0, 0, r))
				return 1;
		break;
	case 2:
		while (n--)
			if (ghcb_ioio_out(0x80, 1, 0))
				return 1;
		break;
	case 3:
		while (n--)
			if ((ghcb_msr_protocol(GHCB_MSR_SEV_INFO_REQ) & GHCB_MSR_INFO_MASK) != GHCB_MSR_SEV_INFO_RESP)
				return 1;
		break;
	default:
		fw_printf("vmgexit-bench: unknown mode %u\n", mode);
		return 3;
	}
	return 0;
}
