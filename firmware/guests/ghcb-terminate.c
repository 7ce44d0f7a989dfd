/* ghcb-terminate: GHCB MSR-protocol termination, reason set 1, code 0x42. */
#include "fw.h"

int guest_main(void)
{
	if (fw.platform == VMMD_PLATFORM_PLAIN) {
		fw_printf("ghcb-terminate: needs a GHCB platform\n");
		return 2;
	}
	fw_printf("ghcb-terminate: MSR protocol termination set 1 code 0x42\n");
	ghcb_msr_protocol(GHCB_MSR_TERM(1, 0x42)); /* 0x421100 */
	fw_printf("ghcb-terminate: VMM resumed the guest\n");
	return 1;
}
