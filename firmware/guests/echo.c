/* echo: echoes what arrives on the serial console until 'q' (tests the UART receive path). */
#include "fw.h"

static uint8_t console_in(uint16_t port)
{
	uint32_t value = 0xff;

	if (!fw_has_ghcb())
		return inb(port);
	ghcb_ioio_in(port, 1, &value);
	return (uint8_t)value;
}

int guest_main(void)
{
	uint16_t com = fw.console_port;

	fw_puts("echo: type; q ends\n");
	for (;;) {
		if (!(console_in(com + 5) & 1)) { /* LSR.DR: a byte is waiting */
			cpu_pause();
			continue;
		}
		char c = (char)console_in(com);
		if (c == 'q') {
			fw_puts("\necho: bye\n");
			return 0;
		}
		fw_putc(c);
	}
}
