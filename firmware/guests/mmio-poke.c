/* mmio-poke: 1/2/4/8-byte writes then reads at bootinfo->mmio_testdev_gpa (a
 * scratch page: reads return what was written). `mov` on plain and sev-es-emu,
 * GHCB MMIO events on sev-es hardware. One line per size; status 1 on a mismatch. */
#include "fw.h"

static uint64_t poke(uint64_t gpa, unsigned size, uint64_t value)
{
	volatile void *p = (volatile void *)(uintptr_t)gpa;
	uint64_t got = 0;

	if (fw.platform == VMMD_PLATFORM_SEV_ES) {
		ghcb_mmio_write(gpa, &value, size);
		ghcb_mmio_read(gpa, &got, size);
		return got;
	}
	switch (size) {
	case 1: *(volatile uint8_t *)p = (uint8_t)value; return *(volatile uint8_t *)p;
	case 2: *(volatile uint16_t *)p = (uint16_t)value; return *(volatile uint16_t *)p;
	case 4: *(volatile uint32_t *)p = (uint32_t)value; return *(volatile uint32_t *)p;
	default: *(volatile uint64_t *)p = value; return *(volatile uint64_t *)p;
	}
}

int guest_main(void)
{
	static const uint64_t values[4] = { 0xA5, 0xBEEF, 0xDEADBEEF, 0x0123456789ABCDEFul };
	uint64_t base = fw.bi->mmio_testdev_gpa, got;
	unsigned i, size, bad = 0;

	if (!base || (fw.platform != VMMD_PLATFORM_SEV_ES && !fw_is_mapped(base))) {
		fw_printf("mmio-poke: test device %#lx not mapped\n", base);
		return 2;
	}
	for (i = 0; i < 4; i++) {
		size = 1u << i;
		got = poke(base + 8 * (i + 1), size, values[i]);
		fw_printf("mmio-poke: %u-byte %s (wrote %#lx, read %#lx)\n", size,
			  got == values[i] ? "ok" : "MISMATCH", values[i], got);
		bad += got != values[i];
	}
	return bad ? 1 : 0;
}
