/* exit-loop (benchmark): bootinfo->guest_arg `outb` to port 0x80, then a clean
 * end. Port 0x80 is an ordinary KVM_EXIT_IO on every platform but hardware,
 * where it goes through the #VC handler. Nothing is printed inside the loop. */
#include "fw.h"

int guest_main(void)
{
	uint64_t n = fw.bi->guest_arg;

	while (n--)
		outb(0x80, 0);
	return 0;
}
