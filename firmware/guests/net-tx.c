/* net-tx: transmit boot-info guest_arg 64-byte frames through virtio-net, one notify per frame or a whole ring
 * per notify, for scripts/bench/notify.py and scripts/bench/net.py.
 *
 * guest_arg bits 0..31: frames; bits 32..39: frames per notify (0 or 1: one; at most QSIZE). For each batch the
 * guest fills the TX descriptors, makes them available, writes QueueNotify once and polls the used ring until
 * the device has taken them all: a notify round trip per batch. The frames (to 02:00:00:00:00:99, ethertype
 * 0x88b5, local experimental) go out on the tap; nothing needs to answer. Ends with debug-exit 0, 1 when the
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

int guest_main(void)
{
	uint64_t base = fw.bi->virtio_net_gpa, area;
	uint32_t frames = (uint32_t)fw.bi->guest_arg, batch = (uint32_t)(fw.bi->guest_arg >> 32) & 0xff, sent = 0;
	unsigned i, qbytes = (virtq_bytes(QSIZE) + 15) & ~15u;
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
	virtio_driver_ok(&dev);
	while (sent < frames) {
		uint32_t n = frames - sent < batch ? frames - sent : batch, done = 0, id, len;
		unsigned polls;

		for (i = 0; i < n; i++)
			virtq_push(&txq, (uint16_t)((sent + i) % QSIZE));
		virtq_notify(&dev, &txq);
		for (polls = 0; done < n && polls < POLLS; polls++) {
			if (virtq_pop_used(&txq, &id, &len))
				done++;
			else
				cpu_pause();
		}
		if (done < n) {
			fw_printf("net-tx: FAIL the device took %u of %u frames (status %#x)\n", done, n, virtio_status(&dev));
			return 1;
		}
		sent += n;
	}
	fw_printf("net-tx: sent %u frames, %u per notify, via %s\n", sent, batch, dev.via_ghcb ? "GHCB MMIO" : "MMIO");
	return 0;
}
