/* hello: one line naming the platform the probe found, then a clean end. */
#include "fw.h"

int guest_main(void)
{
	fw_printf("Hello from a vmmd guest (platform: %s)\n", fw_platform_name(fw.platform));
	return 0;
}
