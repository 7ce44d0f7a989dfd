/* net-tx: transmit boot-info guest_arg 64-byte frames through virtio-net, one notify per frame or a whole ring
 * per notify, for scripts/bench/notify.py and scripts/bench/net.py.
 *
 * guest_arg bits 0..31: frames; bits 32..39: frames per notify (0 or 1: one; at most QSIZE). For each batch the
 * guest makes the next frames available, writes QueueNotify once and polls the used ring until the device has
 * taken them all: a notify round trip per batch. The guest's own work per round trip is kept to a few
 * instructions (on hosts whose KVM emulates guest kernel code each costs about a microsecond), so the figure is
 * the VMM's: descriptor i and avail slot i always carry frame i (the ring size is the descriptor count), so both
 * are written once, before DRIVER_OK, and a batch only moves avail->idx; the device's used->idx says how many
 * it has taken (every used element names a descriptor this guest posted, with nothing to check). The frames
 * (to 02:00:00:00:00:99, ethertype 0x88b5, local experimental) go out on the tap; nothing needs to answer. Ends with debug-exit 0, 1 when the
 * device stops answering, 2 without a device, 3 when it refused set-up. */
#include "fw.h"
#include "virtio.h"

#define VIRTIO_ID_NET 1
#define NET_HDR 12
#define QSIZE 64
#define FRAME 64
#define SLOT 128
#define POLLS 50000000u

extern char __image_end[];
static struct virtio_dev dev;
static struct virtq rxq, txq;

/* One frame per notify over plain MMIO, the notify benchmark's case, in eight instructions a round trip (the C loop
 * takes fourteen, each about a microsecond where KVM emulates guest code): publish the next avail index, write
 * QueueNotify, poll used->idx until it equals the index (at most POLLS reads). Returns the frames not sent: 0 when
 * all went, else the device stopped answering. */
static uint32_t send_one_per_notify(volatile uint16_t *avail_idx, volatile uint16_t *used_idx,
				    volatile uint32_t *notify, uint32_t queue, uint32_t frames)
{
	uint32_t polls;
	uint16_t target = 0;

	if (!frames)
		return 0;
	__asm__ volatile("1:	incw %w[t]\n"
			 "	movw %w[t], (%[avail])\n"
			 "	movl %[q], (%[notify])\n"
			 "	movl %[max], %[p]\n"
			 "2:	cmpw %w[t], (%[used])\n"
			 "	je 3f\n"
			 "	decl %[p]\n"
			 "	jnz 2b\n"
			 "	jmp 4f\n"
			 "3:	decl %[n]\n"
			 "	jnz 1b\n"
			 "4:\n"
			 : [t] "+r"(target), [n] "+r"(frames), [p] "=&r"(polls)
			 : [avail] "r"(avail_idx), [used] "r"(used_idx), [notify] "r"(notify), [q] "r"(queue),
			   [max] "i"(POLLS)
			 : "memory", "cc");
	return frames;
}

int guest_main(void)
{
	uint64_t base = fw.bi->virtio_net_gpa, area;
	uint32_t frames = (uint32_t)fw.bi->guest_arg, batch = (uint32_t)(fw.bi->guest_arg >> 32) & 0xff, left, n = 0;
	unsigned i, qbytes = (virtq_bytes(QSIZE) + 15) & ~15u;
	volatile uint16_t *avail_idx, *used_idx;
	uint16_t target = 0;
	uint8_t *txbuf;

	if (!base) {
		fw_printf("net-tx: no virtio-net device (run with --net)\n");
		return 2;
	}
	if (batch == 0)
		batch = 1;
	if (batch > QSIZE)
		batch = QSIZE;
	area = fw_has_ghcb() ? fw.bi->shared_gpa : (((uintptr_t)__image_end + 0xffff) & ~0xffffull);
	memset((void *)(uintptr_t)area, 0, 2 * qbytes + 4096 + QSIZE * SLOT);
	if (virtio_init(&dev, base, VIRTIO_ID_NET, (1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_ACCESS_PLATFORM)) ||
	    virtq_setup(&dev, &rxq, 0, QSIZE, (void *)(uintptr_t)area) ||
	    virtq_setup(&dev, &txq, 1, QSIZE, (void *)(uintptr_t)(area + qbytes))) {
		fw_printf("net-tx: FAIL set-up refused (status %#x)\n", virtio_status(&dev));
		return 3;
	}
	txbuf = (uint8_t *)(uintptr_t)((area + 2 * qbytes + 4095) & ~4095ull);
	for (i = 0; i < QSIZE; i++) {
		uint8_t *f = txbuf + i * SLOT + NET_HDR;

		memset(f, 0x5a, FRAME);
		memcpy(f, "\x02\x00\x00\x00\x00\x99\x02\x00\x00\x00\x00\x01\x88\xb5", 14);
		virtq_set_desc(&txq, i, (uintptr_t)(txbuf + i * SLOT), NET_HDR + FRAME, 0, 0);
	}
	for (i = 0; i < QSIZE; i++)
		txq.avail[2 + i] = (uint16_t)i; /* avail slot i -> descriptor i, for every lap of the ring */
	virtio_driver_ok(&dev);
	avail_idx = &txq.avail[1];
	used_idx = (volatile uint16_t *)(txq.used + 2);
	if (!dev.via_ghcb && batch == 1) { /* the notify benchmark's case: one store per notify, no call */
		left = send_one_per_notify(avail_idx, used_idx,
					   (volatile uint32_t *)(uintptr_t)(base + VIRTIO_MMIO_QUEUE_NOTIFY), txq.index, frames);
		if (left) {
			fw_printf("net-tx: FAIL the device took %u of %u frames (status %#x)\n", frames - left, frames,
				  virtio_status(&dev));
			return 1;
		}
	} else {
		for (left = frames; left; left -= n) {
			uint32_t polls = POLLS;

			n = left < batch ? left : batch;
			target = (uint16_t)(target + n);
			*avail_idx = target; /* spec 2.7.13: the ring entries were written before this index */
			virtq_notify(&dev, &txq);
			while (*used_idx != target) {
				if (!--polls) {
					fw_printf("net-tx: FAIL the device took %u of %u frames (status %#x)\n",
						  frames - left + (uint16_t)(*used_idx - (uint16_t)(target - n)), frames,
						  virtio_status(&dev));
					return 1;
				}
			}
		}
	}
	fw_printf("net-tx: sent %u frames, %u per notify, via %s\n", frames, batch, dev.via_ghcb ? "GHCB MMIO" : "MMIO");
	return 0;
}
