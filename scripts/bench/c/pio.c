/* pio: the host's own pread/pwrite loop, the baseline of scripts/bench/disk.py.
 *   pio FILE r|w SIZE COUNT SPAN RANDOM DIRECT NBUF
 * COUNT requests of SIZE bytes at offsets i * SIZE % SPAN (RANDOM: a pseudo-random SIZE-aligned offset in SPAN,
 * the same sequence disk.py gives the device), request i into / from buffer i % NBUF of NBUF 4 KiB-aligned
 * SIZE-byte buffers (the device's requests each have their own buffer in guest memory); DIRECT opens O_DIRECT.
 * Prints the elapsed nanoseconds of the loop (open and buffer set-up excluded). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static uint64_t offset_of(uint64_t i, uint64_t size, uint64_t span, int random)
{
	uint64_t slots = span / size;

	if (random)
		return (i * 0x9e3779b97f4a7c15ull >> 17) % slots * size;
	return i % slots * size;
}

int main(int argc, char **argv)
{
	struct timespec t0, t1;
	uint64_t size, count, span, i;
	uint64_t nbuf;
	int write_mode, random, direct, fd;
	void *buf;

	if (argc != 9) {
		fprintf(stderr, "usage: pio FILE r|w SIZE COUNT SPAN RANDOM DIRECT NBUF\n");
		return 2;
	}
	write_mode = argv[2][0] == 'w';
	size = strtoull(argv[3], 0, 0);
	count = strtoull(argv[4], 0, 0);
	span = strtoull(argv[5], 0, 0);
	random = atoi(argv[6]);
	direct = atoi(argv[7]);
	nbuf = strtoull(argv[8], 0, 0);
	fd = open(argv[1], (write_mode ? O_RDWR : O_RDONLY) | (direct ? O_DIRECT : 0));
	if (fd < 0 || !nbuf || posix_memalign(&buf, 4096, size * nbuf)) {
		perror("pio");
		return 1;
	}
	memset(buf, 0x5a, size * nbuf);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < count; i++) {
		uint64_t off = offset_of(i, size, span, random);
		char *b = (char *)buf + i % nbuf * size;
		ssize_t n = write_mode ? pwrite(fd, b, size, off) : pread(fd, b, size, off);

		if (n != (ssize_t)size) {
			perror("pio: short transfer");
			return 1;
		}
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	printf("%lld\n", (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
	return 0;
}
