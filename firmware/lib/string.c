/* The few string.h functions gcc may emit calls to even with -ffreestanding.
 * Byte loops on purpose: images stay small and nothing here is hot. */
#include "fw.h"

void *memset(void *d, int c, size_t n)
{
	volatile unsigned char *p = d; /* volatile: keep gcc from turning this into a memset call */

	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	volatile unsigned char *p = d;
	const unsigned char *q = s;

	while (n--)
		*p++ = *q++;
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const unsigned char *p = a, *q = b;

	for (; n; n--, p++, q++)
		if (*p != *q)
			return *p - *q;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}
