/*
 * reset: end the machine the ways a Linux kernel does (arch/x86/kernel/reboot.c, drivers/acpi/sleep.c),
 * chosen by the boot-info guest_arg (vmctl run --guest-arg N):
 *   0  reboot=k  i8042 "pulse reset line" command 0xFE on port 0x64, after waiting for its input buffer
 *   1  reboot=p  reset control register 0xCF9: 0x02, then 0x06 (RST_CPU)
 *   2  poweroff  ACPI S5: SLP_TYP 5 | SLP_EN on the FADT's sleep control register (port 0x600)
 * Each should end the VM (reboot: exit 9; poweroff: exit 0); if it does not, the guest says so and exits 1.
 */
#include "fw.h"

#define I8042_STATUS_PORT 0x64
#define I8042_INPUT_FULL  0x02
#define RESET_CONTROL_PORT 0xCF9
#define SLEEP_CONTROL_PORT 0x600
#define SLP_TYP_S5 (5 << 2)
#define SLP_EN (1 << 5)

int guest_main(void)
{
	uint64_t how = fw.bi->guest_arg;

	switch (how) {
	case 0:
		fw_printf("reset: i8042 reset command (reboot=k)\n");
		for (int i = 0; i < 0x10000 && (inb(I8042_STATUS_PORT) & I8042_INPUT_FULL); i++)
			;
		outb(I8042_STATUS_PORT, 0xFE);
		break;
	case 1:
		fw_printf("reset: reset control register 0xCF9 (reboot=p)\n");
		outb(RESET_CONTROL_PORT, 0x02);
		outb(RESET_CONTROL_PORT, 0x06);
		break;
	case 2:
		fw_printf("reset: ACPI S5 (poweroff)\n");
		outb(SLEEP_CONTROL_PORT, SLP_TYP_S5 | SLP_EN);
		break;
	default:
		fw_printf("reset: unknown method %u\n", (unsigned)how);
		return 2;
	}
	fw_printf("reset: still running after the request\n");
	return 1;
}
