/*
 * Minimal polling virtio-mmio (version 2) driver library for the test guests
 * (firmware/lib/virtio.c): register access, feature negotiation, split
 * virtqueues. No interrupts: the guest polls the used ring.
 *
 * Register offsets: virtio 1.x spec 4.2.2 / Linux include/uapi/linux/virtio_mmio.h.
 * Ring layout: spec 2.7 / include/uapi/linux/virtio_ring.h.
 * Registers are reached with plain MMIO on plain guests and with GHCB MMIO
 * events (NAE 0x80000001/2) where a GHCB exists (sev-es, sev-es-emu); rings and
 * buffers must then live in shared (unencrypted) memory, bootinfo->shared_gpa.
 */
#ifndef VMMD_VIRTIO_H
#define VMMD_VIRTIO_H

#include <stdint.h>

#define VIRTIO_MMIO_MAGIC_VALUE       0x000
#define VIRTIO_MMIO_VERSION           0x004
#define VIRTIO_MMIO_DEVICE_ID         0x008
#define VIRTIO_MMIO_VENDOR_ID         0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES   0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES   0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL         0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX     0x034
#define VIRTIO_MMIO_QUEUE_NUM         0x038
#define VIRTIO_MMIO_QUEUE_READY       0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY      0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS  0x060
#define VIRTIO_MMIO_INTERRUPT_ACK     0x064
#define VIRTIO_MMIO_STATUS            0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW    0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH   0x084
#define VIRTIO_MMIO_QUEUE_AVAIL_LOW   0x090
#define VIRTIO_MMIO_QUEUE_AVAIL_HIGH  0x094
#define VIRTIO_MMIO_QUEUE_USED_LOW    0x0a0
#define VIRTIO_MMIO_QUEUE_USED_HIGH   0x0a4
#define VIRTIO_MMIO_CONFIG            0x100

#define VIRTIO_MMIO_MAGIC 0x74726976u /* "virt" */

/* device status (include/uapi/linux/virtio_config.h) */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER      2
#define VIRTIO_STATUS_DRIVER_OK   4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED      0x80

#define VIRTIO_F_VERSION_1       32
#define VIRTIO_F_ACCESS_PLATFORM 33

#define VIRTQ_DESC_F_NEXT  1
#define VIRTQ_DESC_F_WRITE 2

struct virtq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct virtio_dev {
	uint64_t base;     /* GPA of the register page */
	int via_ghcb;      /* 1: registers through GHCB MMIO events */
	uint64_t features; /* negotiated */
};

struct virtq {
	unsigned index;
	unsigned size;                    /* power of two */
	volatile struct virtq_desc *desc; /* 16-aligned */
	volatile uint16_t *avail;         /* flags, idx, ring[size], used_event */
	volatile uint8_t *used;           /* flags, idx, {id, len}[size], avail_event */
	uint16_t avail_idx;               /* next free avail slot (driver's copy of avail->idx) */
	uint16_t last_used;               /* used entries consumed so far */
};

/* bytes one queue needs at a 4 KiB-aligned address (desc, avail, then used at the next 4-byte boundary) */
unsigned virtq_bytes(unsigned size);

uint32_t virtio_read32(struct virtio_dev *d, unsigned off);
void virtio_write32(struct virtio_dev *d, unsigned off, uint32_t v);
uint8_t virtio_config8(struct virtio_dev *d, unsigned off);

/* Reset, ACKNOWLEDGE, DRIVER, negotiate (device features & want), FEATURES_OK.
 * Returns 0, or -1 bad magic/version, -2 device id mismatch, -3 FEATURES_OK refused. */
int virtio_init(struct virtio_dev *d, uint64_t base, uint32_t device_id, uint64_t want);
/* Set up queue `index` with `size` entries in `mem` (virtq_bytes(size) zeroed bytes, 16-aligned, identity mapped).
 * Returns 0, or -1 when the device has no such queue or it is smaller than `size`. */
int virtq_setup(struct virtio_dev *d, struct virtq *q, unsigned index, unsigned size, void *mem);
void virtio_driver_ok(struct virtio_dev *d);
uint32_t virtio_status(struct virtio_dev *d);

/* Fill descriptor `i` of q. */
void virtq_set_desc(struct virtq *q, unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next);
/* Make the chain at `head` available (does not notify). */
void virtq_push(struct virtq *q, uint16_t head);
void virtq_notify(struct virtio_dev *d, struct virtq *q);
/* Take one used entry: 1 and *id / *len when there is one, else 0. */
int virtq_pop_used(struct virtq *q, uint32_t *id, uint32_t *len);

#endif /* VMMD_VIRTIO_H */
