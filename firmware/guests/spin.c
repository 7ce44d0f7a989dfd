/* spin: never exits; a host test stops it (timeout, vmctl stop). */
#include "fw.h"

int guest_main(void)
{
	fw_printf("spin: spinning forever\n");
	for (;;)
		cpu_pause();
}
