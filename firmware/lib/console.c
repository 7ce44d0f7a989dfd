/*
 * Serial console (16550 transmit register at bootinfo->console_port) and a
 * tiny printf: %s %c %d %i %u %x %X %p %%, the `l`/`ll`/`z` length modifiers,
 * the `0`, `-`, `#` flags and a field width. No floating point.
 *
 * The VMM's UART is always ready to transmit, so LSR is not polled (each poll
 * would be one more exit). On GHCB platforms fw_putc() is one GHCB IOIO event per
 * byte; fw_puts() and fw_printf() gather their text (up to CONSOLE_BATCH bytes at a
 * time) and send it as one string IOIO event (`rep outsb`, the bytes in the GHCB
 * shared buffer), as Linux's #VC handler forwards a `rep outsb` (vc_handle_ioio()).
 * The UART receives the same bytes in the same order; a call's text is sent
 * before it returns.
 */
#include "fw.h"

void fw_putc(char c)
{
	if (fw_has_ghcb())
		ghcb_ioio_out(fw.console_port, 1, (uint8_t)c);
	else if (fw.platform != VMMD_PLATFORM_SEV_ES)
		outb(fw.console_port, (uint8_t)c); /* plain, or sev-es-emu before negotiation */
}

#define CONSOLE_BATCH 256 /* bytes per string IOIO event: fits the GHCB shared buffer (2032) */

struct sink {
	char *buf;      /* NULL: console */
	size_t size;
	size_t len;     /* characters produced (snprintf return value) */
	char *batch;    /* console on a GHCB platform: text not yet sent, `batched` bytes */
	unsigned batched;
};

static void send_batch(struct sink *k)
{
	if (k->batched)
		ghcb_ioio_outs(fw.console_port, 1, k->batch, k->batched);
	k->batched = 0;
}

static void emit(struct sink *k, char c)
{
	if (k->batch) {
		k->batch[k->batched++] = c;
		if (k->batched == CONSOLE_BATCH)
			send_batch(k);
	} else if (!k->buf)
		fw_putc(c);
	else if (k->len + 1 < k->size)
		k->buf[k->len] = c;
	k->len++;
}

static void emit_pad(struct sink *k, char c, int n)
{
	while (n-- > 0)
		emit(k, c);
}

static void format(struct sink *k, const char *fmt, va_list ap)
{
	static const char lower[] = "0123456789abcdef", upper[] = "0123456789ABCDEF";
	char tmp[24];

	for (; *fmt; fmt++) {
		int zero = 0, left = 0, alt = 0, width = 0, lng = 0, neg = 0, n = 0;
		unsigned base = 10;
		const char *digits = lower;
		const char *prefix = "";
		uint64_t v;

		if (*fmt != '%') {
			emit(k, *fmt);
			continue;
		}
		for (fmt++;; fmt++) {
			if (*fmt == '0') zero = 1;
			else if (*fmt == '-') left = 1;
			else if (*fmt == '#') alt = 1;
			else break;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (*fmt++ - '0');
		while (*fmt == 'l' || *fmt == 'z') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case '\0':
			return;
		case 'c':
			emit_pad(k, ' ', left ? 0 : width - 1);
			emit(k, (char)va_arg(ap, int));
			emit_pad(k, ' ', left ? width - 1 : 0);
			continue;
		case 's': {
			const char *s = va_arg(ap, const char *);
			int len;

			if (!s)
				s = "(null)";
			len = (int)strlen(s);
			emit_pad(k, ' ', left ? 0 : width - len);
			while (*s)
				emit(k, *s++);
			emit_pad(k, ' ', left ? width - len : 0);
			continue;
		}
		case 'd':
		case 'i': {
			int64_t s = lng ? va_arg(ap, int64_t) : va_arg(ap, int);

			neg = s < 0;
			v = neg ? -(uint64_t)s : (uint64_t)s;
			break;
		}
		case 'p':
			lng = 1;
			alt = 1;
			/* fall through */
		case 'x':
		case 'X':
			base = 16;
			if (*fmt == 'X')
				digits = upper;
			/* fall through */
		case 'u':
			v = lng ? va_arg(ap, uint64_t) : va_arg(ap, unsigned);
			if (alt && base == 16)
				prefix = "0x";
			break;
		default: /* %% and anything unknown: print it */
			emit(k, *fmt);
			continue;
		}
		do {
			tmp[n++] = digits[v % base];
			v /= base;
		} while (v);
		if (neg)
			prefix = "-";
		width -= n + (int)strlen(prefix);
		if (!left && !zero)
			emit_pad(k, ' ', width);
		while (*prefix)
			emit(k, *prefix++);
		if (!left && zero)
			emit_pad(k, '0', width);
		while (n)
			emit(k, tmp[--n]);
		if (left)
			emit_pad(k, ' ', width);
	}
}

/* Format to the console; on GHCB platforms in batches (one string IOIO event each, not one per byte). */
static size_t console_vprintf(const char *fmt, va_list ap)
{
	char batch[CONSOLE_BATCH];
	struct sink k = { 0, 0, 0, fw_has_ghcb() ? batch : 0, 0 };

	format(&k, fmt, ap);
	if (k.batch)
		send_batch(&k);
	return k.len;
}

int fw_printf(const char *fmt, ...)
{
	va_list ap;
	size_t len;

	va_start(ap, fmt);
	len = console_vprintf(fmt, ap);
	va_end(ap);
	return (int)len;
}

void fw_puts(const char *s)
{
	fw_printf("%s", s);
}

int fw_vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
	struct sink k = { buf, size, 0, 0, 0 };

	format(&k, fmt, ap);
	if (size)
		buf[k.len < size ? k.len : size - 1] = '\0';
	return (int)k.len;
}

int fw_snprintf(char *buf, size_t size, const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = fw_vsnprintf(buf, size, fmt, ap);
	va_end(ap);
	return n;
}
