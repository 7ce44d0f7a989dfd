/* blk: a polling virtio-blk driver (virtio 1.x spec 5.2) that writes a pattern across the whole first disk,
 * flushes it, reads it back and verifies it, and reports its own throughput.
 *
 * Requests are header / data / status chains (struct virtio_blk_outhdr, include/uapi/linux/virtio_blk.h), one in
 * flight at a time, CHUNK bytes each. Rings, headers, status bytes and the data buffer live in
 * bootinfo->shared_gpa where a GHCB exists (the host cannot read private SEV-ES memory), in private RAM after
 * the image on plain.
 *
 * guest_arg selects what it does (tests/e2e/test_disk.py):
 *   0  write the pattern, flush, print "blk: flushed", read back and verify; exit 0. Then the throughput of the
 *      requests themselves (TSC ticks from submission to the used entry, the TSC's rate from CPUID 0x15/0x16 or
 *      counted across one second of the CMOS RTC), without the guest's own time filling and checking buffers
 *   1  write the pattern, flush, print "blk: flushed", then wait (the test SIGKILLs the VMM and reads the image)
 *   2  read-only disk: a write must come back VIRTIO_BLK_S_IOERR and a read OK; exit 0
 * Pattern: the 64-bit word at byte offset o of the disk is blk_pattern(o) (the host computes the same).
 * Exit codes: 0 success, 1 verification or I/O failure, 2 no disk, 3 device set-up refused. */
#include "fw.h"
#include "virtio.h"

#define VIRTIO_ID_BLOCK 2
#define VIRTIO_BLK_F_SIZE_MAX 1
#define VIRTIO_BLK_F_SEG_MAX 2
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_BLK_SIZE 6
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define QSIZE 8
#define CHUNK (64u << 10)
#define POLLS 50000000u

extern char __image_end[];

struct virtio_blk_outhdr {
	uint32_t type;
	uint32_t ioprio;
	uint64_t sector;
};

static struct virtio_dev dev;
static struct virtq q;
static volatile struct virtio_blk_outhdr *hdr;
static volatile uint8_t *status;
static uint8_t *buf;

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (uint64_t)hi << 32 | lo;
}

static uint64_t blk_pattern(uint64_t offset)
{
	return (offset * 0x9e3779b97f4a7c15ull) ^ 0x766d6d64626c6b00ull; /* "vmmdblk" */
}

/* one request; returns the status byte, or -1 when the device did not answer */
static int request(uint32_t type, uint64_t sector, uint32_t len)
{
	uint32_t id, used_len;
	unsigned i;

	hdr->type = type;
	hdr->ioprio = 0;
	hdr->sector = sector;
	*status = 0xff;
	if (len) {
		virtq_set_desc(&q, 0, (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 1);
		virtq_set_desc(&q, 1, (uintptr_t)buf, len,
			       VIRTQ_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VIRTQ_DESC_F_WRITE : 0), 2);
	} else {
		virtq_set_desc(&q, 0, (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 2);
	}
	virtq_set_desc(&q, 2, (uintptr_t)status, 1, VIRTQ_DESC_F_WRITE, 0);
	virtq_push(&q, 0);
	virtq_notify(&dev, &q);
	for (i = 0; i < POLLS; i++) {
		if (virtq_pop_used(&q, &id, &used_len))
			return *status;
		cpu_pause();
	}
	fw_printf("blk: FAIL request type %u sector %lu not completed (device status %#x)\n", type, sector,
		  virtio_status(&dev));
	return -1;
}

static uint64_t config64(unsigned off)
{
	uint64_t v = 0;
	unsigned i;

	for (i = 0; i < 8; i++)
		v |= (uint64_t)virtio_config8(&dev, off + i) << (8 * i);
	return v;
}

static void port_out8(uint16_t port, uint8_t v)
{
	if (fw_has_ghcb())
		ghcb_ioio_out(port, 1, v);
	else
		outb(port, v);
}

static uint8_t port_in8(uint16_t port)
{
	uint32_t v = 0xff;

	if (fw_has_ghcb())
		ghcb_ioio_in(port, 1, &v);
	else
		v = inb(port);
	return (uint8_t)v;
}

/* the CMOS RTC's seconds register (MC146818 index 0x00 at ports 0x70/0x71), 0xff when there is no RTC */
static uint8_t rtc_seconds(void)
{
	port_out8(0x70, 0x00);
	return port_in8(0x71);
}

/* TSC ticks per microsecond counted across one tick of the RTC's seconds (up to 2 s), 0 when it does not tick */
static uint64_t tsc_per_us_from_rtc(void)
{
	uint64_t t0, spins;
	uint8_t s = rtc_seconds(), s1;

	if (s == 0xff)
		return 0;
	for (spins = 0; (s1 = rtc_seconds()) == s; spins++)
		if (spins > 10000000u)
			return 0;
	t0 = rdtsc();
	for (spins = 0; rtc_seconds() == s1; spins++)
		if (spins > 10000000u)
			return 0;
	return (rdtsc() - t0) / 1000000u;
}

/* TSC ticks per microsecond: CPUID 0x15 / 0x16 where the CPU reports them, else measured against the RTC */
static uint64_t tsc_per_us(void)
{
	static uint64_t known;
	uint32_t r[4];

	if (known)
		return known;

	fw_cpuid(0, 0, r);
	if (r[0] >= 0x15) {
		fw_cpuid(0x15, 0, r);
		if (r[0] && r[1] && r[2])
			return known = (uint64_t)r[2] * r[1] / r[0] / 1000000u;
	}
	fw_cpuid(0, 0, r);
	if (r[0] >= 0x16) {
		fw_cpuid(0x16, 0, r);
		if (r[0] & 0xffff)
			return known = r[0] & 0xffff; /* base frequency in MHz */
	}
	return known = tsc_per_us_from_rtc();
}

static void report(const char *what, uint64_t bytes, uint64_t ticks, uint64_t per_us)
{
	if (per_us && ticks) {
		uint64_t us = ticks / per_us;

		fw_printf("blk: %s %lu KiB in %lu us: %lu KiB/s\n", what, bytes >> 10, us,
			  us ? (bytes >> 10) * 1000000u / us : 0);
	} else {
		fw_printf("blk: %s %lu KiB in %lu TSC ticks (no TSC frequency known)\n", what, bytes >> 10, ticks);
	}
}

static int write_pattern(uint64_t size, int timed)
{
	uint64_t off, t, t0 = 0; /* TSC ticks spent in requests: the device's part, not the pattern's */
	uint32_t i, len;

	for (off = 0; off < size; off += len) {
		len = size - off < CHUNK ? (uint32_t)(size - off) : CHUNK;
		for (i = 0; i < len; i += 8)
			*(uint64_t *)(buf + i) = blk_pattern(off + i);
		t = rdtsc();
		if (request(VIRTIO_BLK_T_OUT, off >> 9, len) != VIRTIO_BLK_S_OK) {
			fw_printf("blk: FAIL write at %lu\n", off);
			return -1;
		}
		t0 += rdtsc() - t;
	}
	if (request(VIRTIO_BLK_T_FLUSH, 0, 0) != VIRTIO_BLK_S_OK) {
		fw_printf("blk: FAIL flush\n");
		return -1;
	}
	fw_printf("blk: flushed\n");
	report("wrote", size, t0, timed ? tsc_per_us() : 0);
	return 0;
}

static int verify(uint64_t size)
{
	uint64_t off, t, ticks = 0; /* TSC ticks spent in requests, as in write_pattern() */
	uint32_t i, len;

	for (off = 0; off < size; off += len) {
		len = size - off < CHUNK ? (uint32_t)(size - off) : CHUNK;
		memset(buf, 0, len);
		t = rdtsc();
		if (request(VIRTIO_BLK_T_IN, off >> 9, len) != VIRTIO_BLK_S_OK) {
			fw_printf("blk: FAIL read at %lu\n", off);
			return -1;
		}
		ticks += rdtsc() - t;
		for (i = 0; i < len; i += 8) {
			if (*(uint64_t *)(buf + i) != blk_pattern(off + i)) {
				fw_printf("blk: FAIL mismatch at byte %lu\n", off + i);
				return -1;
			}
		}
	}
	report("read", size, ticks, tsc_per_us());
	fw_printf("blk: verified %lu bytes\n", size);
	return 0;
}

int guest_main(void)
{
	uint64_t area, base, sectors, size;
	uint64_t mode = fw.bi->guest_arg;
	unsigned qbytes = (virtq_bytes(QSIZE) + 4095) & ~4095u;
	int err;

	if (fw.bi->size < sizeof(struct vmmd_bootinfo) || !fw.bi->virtio_blk_count) {
		fw_printf("blk: no virtio-blk device (run with --disk)\n");
		return 2;
	}
	base = fw.bi->virtio_blk_gpa[0];
	if (fw_has_ghcb())
		area = fw.bi->shared_gpa; /* shared with the host: the device reads rings and buffers here */
	else
		area = ((uintptr_t)__image_end + 0xffff) & ~0xffffull;
	memset((void *)(uintptr_t)area, 0, qbytes + 4096);
	err = virtio_init(&dev, base, VIRTIO_ID_BLOCK,
			  (1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_ACCESS_PLATFORM) | (1ull << VIRTIO_BLK_F_FLUSH) |
			  (1ull << VIRTIO_BLK_F_RO) | (1ull << VIRTIO_BLK_F_BLK_SIZE) | (1ull << VIRTIO_BLK_F_SEG_MAX) |
			  (1ull << VIRTIO_BLK_F_SIZE_MAX));
	if (err) {
		fw_printf("blk: FAIL virtio init error %d (status %#x)\n", err, virtio_status(&dev));
		return 3;
	}
	if (virtq_setup(&dev, &q, 0, QSIZE, (void *)(uintptr_t)area)) {
		fw_printf("blk: FAIL queue set-up refused (status %#x)\n", virtio_status(&dev));
		return 3;
	}
	hdr = (volatile struct virtio_blk_outhdr *)(uintptr_t)(area + qbytes);
	status = (volatile uint8_t *)(uintptr_t)(area + qbytes + 64);
	buf = (uint8_t *)(uintptr_t)(area + qbytes + 4096);
	virtio_driver_ok(&dev);
	sectors = config64(0);
	size = sectors << 9;
	fw_printf("blk: virtio-blk at %#lx via %s, %lu sectors, features %#lx%s\n", base,
		  dev.via_ghcb ? "GHCB MMIO events" : "MMIO", sectors, dev.features,
		  dev.features & (1ull << VIRTIO_BLK_F_RO) ? " (read-only)" : "");
	if (mode == 2) {
		memset(buf, 0xa5, 512);
		err = request(VIRTIO_BLK_T_OUT, 0, 512);
		if (err != VIRTIO_BLK_S_IOERR) {
			fw_printf("blk: FAIL write to a read-only disk answered %d, not IOERR\n", err);
			return 1;
		}
		fw_printf("blk: write refused with VIRTIO_BLK_S_IOERR\n");
		if (request(VIRTIO_BLK_T_IN, 0, 512) != VIRTIO_BLK_S_OK) {
			fw_printf("blk: FAIL read from the read-only disk\n");
			return 1;
		}
		fw_printf("blk: read ok\n");
		return 0;
	}
	if (write_pattern(size, mode == 0))
		return 1;
	if (mode == 1) {
		for (;;)
			cpu_pause(); /* the test kills the VMM now */
	}
	if (request(VIRTIO_BLK_T_IN, sectors, 512) != VIRTIO_BLK_S_IOERR) {
		fw_printf("blk: FAIL a read past the end was not refused\n");
		return 1;
	}
	if (verify(size))
		return 1;
	fw_printf("blk: ok\n");
	return 0;
}
