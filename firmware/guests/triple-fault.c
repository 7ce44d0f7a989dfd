/* triple-fault: load a zero-limit IDT, then ud2: #UD -> #DF -> shutdown. */
#include "fw.h"

int guest_main(void)
{
	struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = { 0, 0 };

	fw_printf("triple-fault: lidt limit 0; ud2\n");
	__asm__ volatile("lidt %0; ud2" : : "m"(idtr) : "memory");
	return 1; /* not reached */
}
