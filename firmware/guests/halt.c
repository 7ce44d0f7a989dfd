/* halt: one line, then hlt with IF = 0 (nothing can wake it). */
#include "fw.h"

int guest_main(void)
{
	fw_printf("halt: hlt with IF=0\n");
	fw_halt_forever();
}
