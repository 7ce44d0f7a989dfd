/* ghcb-garbage: point the GHCB MSR at a GPA far outside guest RAM and do a
 * VMGEXIT. The VMM must stop the VM with a reason; resuming is a failure.
 * For sev-es-emu: on sev-es hardware the kernel handles the VMGEXIT and, when
 * it cannot map the GHCB, returns straight to the guest without an exit
 * (arch/x86/kvm/svm/sev.c sev_handle_vmgexit(): "Without a GHCB, just return
 * right back to the guest"), so this guest reports being resumed there. */
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
