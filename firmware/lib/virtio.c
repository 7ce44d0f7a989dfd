/*
 * Polling virtio-mmio driver primitives (include/virtio.h): the device-
 * initialisation sequence of virtio 1.x spec 3.1.1, split-queue set-up for
 * MMIO version 2 (spec 4.2.3.2) and the avail / used ring updates of spec
 * 2.7.13 / 2.7.14, after Linux drivers/virtio/virtio_mmio.c and virtio_ring.c.
 * Register accesses are plain MMIO on plain guests and GHCB MMIO events where
 * a GHCB exists (on SEV-ES hardware an MMIO access would raise #VC).
 */
#include "fw.h"
#include "virtio.h"

#define barrier() __asm__ volatile("" ::: "memory") /* x86 keeps stores in order; stop the compiler reordering */

unsigned virtq_bytes(unsigned size)
{
	unsigned used_off = (16 * size + 6 + 2 * size + 3) & ~3u;

	return used_off + 6 + 8 * size;
}

uint32_t virtio_read32(struct virtio_dev *d, unsigned off)
{
	uint32_t v = 0xffffffffu;

	if (d->via_ghcb) {
		if (ghcb_mmio_read(d->base + off, &v, 4) != GHCB_RESULT_OK)
			return 0xffffffffu;
		return v;
	}
	return *(volatile uint32_t *)(uintptr_t)(d->base + off);
}

void virtio_write32(struct virtio_dev *d, unsigned off, uint32_t v)
{
	if (d->via_ghcb)
		ghcb_mmio_write(d->base + off, &v, 4);
	else
		*(volatile uint32_t *)(uintptr_t)(d->base + off) = v;
}

uint8_t virtio_config8(struct virtio_dev *d, unsigned off)
{
	uint8_t v = 0xff;

	if (d->via_ghcb) {
		ghcb_mmio_read(d->base + VIRTIO_MMIO_CONFIG + off, &v, 1);
		return v;
	}
	return *(volatile uint8_t *)(uintptr_t)(d->base + VIRTIO_MMIO_CONFIG + off);
}

uint32_t virtio_status(struct virtio_dev *d)
{
	return virtio_read32(d, VIRTIO_MMIO_STATUS);
}

int virtio_init(struct virtio_dev *d, uint64_t base, uint32_t device_id, uint64_t want)
{
	uint64_t offered;
	uint32_t status;

	d->base = base;
	d->via_ghcb = fw_has_ghcb();
	d->features = 0;
	if (virtio_read32(d, VIRTIO_MMIO_MAGIC_VALUE) != VIRTIO_MMIO_MAGIC || virtio_read32(d, VIRTIO_MMIO_VERSION) != 2)
		return -1;
	if (virtio_read32(d, VIRTIO_MMIO_DEVICE_ID) != device_id)
		return -2;
	virtio_write32(d, VIRTIO_MMIO_STATUS, 0);
	status = VIRTIO_STATUS_ACKNOWLEDGE;
	virtio_write32(d, VIRTIO_MMIO_STATUS, status);
	status |= VIRTIO_STATUS_DRIVER;
	virtio_write32(d, VIRTIO_MMIO_STATUS, status);
	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	offered = virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES);
	virtio_write32(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (uint64_t)virtio_read32(d, VIRTIO_MMIO_DEVICE_FEATURES) << 32;
	d->features = offered & want;
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)d->features);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_write32(d, VIRTIO_MMIO_DRIVER_FEATURES, (uint32_t)(d->features >> 32));
	status |= VIRTIO_STATUS_FEATURES_OK;
	virtio_write32(d, VIRTIO_MMIO_STATUS, status);
	if (!(virtio_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
		virtio_write32(d, VIRTIO_MMIO_STATUS, status | VIRTIO_STATUS_FAILED);
		return -3;
	}
	return 0;
}

int virtq_setup(struct virtio_dev *d, struct virtq *q, unsigned index, unsigned size, void *mem)
{
	uint64_t desc = (uintptr_t)mem;
	uint64_t avail = desc + 16 * size;
	uint64_t used = (avail + 6 + 2 * size + 3) & ~3ull;

	virtio_write32(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_read32(d, VIRTIO_MMIO_QUEUE_READY) || virtio_read32(d, VIRTIO_MMIO_QUEUE_NUM_MAX) < size)
		return -1;
	q->index = index;
	q->size = size;
	q->desc = (volatile struct virtq_desc *)(uintptr_t)desc;
	q->avail = (volatile uint16_t *)(uintptr_t)avail;
	q->used = (volatile uint8_t *)(uintptr_t)used;
	q->avail_idx = 0;
	q->last_used = 0;
	virtio_write32(d, VIRTIO_MMIO_QUEUE_NUM, size);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint32_t)avail);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (uint32_t)(avail >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_USED_LOW, (uint32_t)used);
	virtio_write32(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (uint32_t)(used >> 32));
	virtio_write32(d, VIRTIO_MMIO_QUEUE_READY, 1);
	return virtio_read32(d, VIRTIO_MMIO_QUEUE_READY) == 1 ? 0 : -1;
}

void virtio_driver_ok(struct virtio_dev *d)
{
	virtio_write32(d, VIRTIO_MMIO_STATUS, virtio_status(d) | VIRTIO_STATUS_DRIVER_OK);
}

void virtq_set_desc(struct virtq *q, unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
	q->desc[i].addr = addr;
	q->desc[i].len = len;
	q->desc[i].flags = flags;
	q->desc[i].next = next;
}

void virtq_push(struct virtq *q, uint16_t head)
{
	q->avail[2 + (q->avail_idx & (q->size - 1))] = head;
	barrier(); /* ring entry before the index (spec 2.7.13.2) */
	q->avail_idx++;
	q->avail[1] = q->avail_idx;
	barrier();
}

void virtq_notify(struct virtio_dev *d, struct virtq *q)
{
	virtio_write32(d, VIRTIO_MMIO_QUEUE_NOTIFY, q->index);
}

int virtq_pop_used(struct virtq *q, uint32_t *id, uint32_t *len)
{
	volatile uint32_t *elem;

	if (*(volatile uint16_t *)(q->used + 2) == q->last_used)
		return 0;
	barrier(); /* index before the entry */
	elem = (volatile uint32_t *)(q->used + 4 + 8 * (q->last_used & (q->size - 1)));
	*id = elem[0];
	*len = elem[1];
	q->last_used++;
	return 1;
}
