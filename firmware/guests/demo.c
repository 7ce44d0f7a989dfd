/* demo (what `make run` boots): platform, GHCB version, CPU vendor and brand
 * string fetched through GHCB CPUID where a GHCB exists, then a clean end. */
#include "fw.h"

int guest_main(void)
{
	uint32_t r[4], brand[13];
	char vendor[13];
	const char *b;
	int i, err = 0;

	fw_printf("vmmd demo guest\n");
	fw_printf("platform:  %s\n", fw_platform_name(fw.platform));
	if (fw_has_ghcb())
		fw_printf("GHCB:      protocol v%u (host offers v%u..v%u)\n", fw.ghcb_version,
			  GHCB_MSR_PROTO_MIN(fw.sev_info), GHCB_MSR_PROTO_MAX(fw.sev_info));
	else
		fw_printf("GHCB:      no GHCB (plain I/O instructions)\n");

	err |= fw_cpuid(0, 0, r);
	memcpy(vendor, &r[1], 4);
	memcpy(vendor + 4, &r[3], 4);
	memcpy(vendor + 8, &r[2], 4);
	vendor[12] = '\0';
	fw_printf("vendor:    %s%s\n", vendor, fw_has_ghcb() ? " (via GHCB CPUID)" : "");

	err |= fw_cpuid(0x80000000, 0, r);
	brand[12] = 0;
	if (r[0] >= 0x80000004) {
		for (i = 0; i < 3; i++)
			err |= fw_cpuid(0x80000002 + i, 0, &brand[4 * i]);
		for (b = (const char *)brand; *b == ' '; b++)
			;
		fw_printf("brand:     %s\n", *b ? b : "(empty)");
	} else {
		fw_printf("brand:     (no brand string leaves)\n");
	}
	if (fw.platform == VMMD_PLATFORM_SEV_ES_EMU)
		fw_printf("note:      sev-es-emu encrypts nothing and attests nothing\n");
	if (err)
		fw_printf("demo: a GHCB CPUID event failed\n");
	return err ? 1 : 0;
}
