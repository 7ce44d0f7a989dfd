/* ghcb-garbage: point the GHCB MSR at a GPA far outside guest RAM and do a
 * VMGEXIT. The VMM must stop the VM with a reason; resuming is a failure. */
#include "fw.h"

#define GARBAGE_GHCB_GPA 0x7f0000000000ul

int guest_main(void)
{
	if (fw.platform == VMMD_PLATFORM_PLAIN) {
		fw_printf("ghcb-garbage: needs a GHCB platform\n");
		return 2;
	}
	fw_printf("ghcb-garbage: GHCB MSR = %#lx, VMGEXIT\n", GARBAGE_GHCB_GPA);
	ghcb_write_msr(GARBAGE_GHCB_GPA);
	ghcb_vmgexit();
	fw_printf("ghcb-garbage: VMM resumed the guest\n");
	return 1;
}
