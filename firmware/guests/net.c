/* net: a polling virtio-net driver that talks to the host across the tap.
 *
 * Address plan (tests/e2e/test_net.py): guest 10.0.2.15/24, host 10.0.2.2.
 * Sends ARP who-has 10.0.2.2, then UDP "hello from vmmd guest" 10.0.2.15:7777 ->
 * 10.0.2.2:7777, waits (bounded polling of the used ring) for a UDP reply and
 * prints it. Answers ARP requests for 10.0.2.15 while it waits.
 * Rings and buffers: bootinfo->shared_gpa where a GHCB exists (the host cannot
 * read private SEV-ES memory), private RAM after the image on plain.
 * Ends with debug-exit 0 on success, 1 when no reply came, 2 without a device,
 * 3 when the device refused set-up. */
#include "fw.h"
#include "virtio.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_NET_F_MAC 5
#define NET_HDR 12 /* struct virtio_net_hdr_v1 */
#define QSIZE 8
#define BUF_SIZE 2048
#define GUEST_IP 0x0a00020fu /* 10.0.2.15 */
#define HOST_IP 0x0a000202u  /* 10.0.2.2 */
#define UDP_PORT 7777
#define POLLS 400000u /* used-ring polls per wait; each poll is a few instructions */

static const char hello[] = "hello from vmmd guest";
extern char __image_end[];

static struct virtio_dev dev;
static struct virtq rxq, txq;
static uint8_t *rxbuf, *txbuf;
static uint8_t mac[6], host_mac[6];
static unsigned tx_next;

static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = (uint8_t)v; }
static void put32(uint8_t *p, uint32_t v) { put16(p, v >> 16); put16(p + 2, (uint16_t)v); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }

static int device_broken(void)
{
	uint32_t st = virtio_status(&dev);

	if (st & VIRTIO_STATUS_NEEDS_RESET) {
		fw_printf("net: FAIL device needs reset (status %#x)\n", st);
		return 1;
	}
	return 0;
}

/* send the frame of `len` bytes built at tx_frame(); waits (bounded) for the device to take it */
static uint8_t *tx_frame(void)
{
	uint8_t *b = txbuf + (tx_next % QSIZE) * BUF_SIZE;

	memset(b, 0, NET_HDR + 60);
	return b + NET_HDR;
}

static int tx_send(unsigned len)
{
	unsigned slot = tx_next % QSIZE;
	uint32_t id, used_len;
	unsigned i;

	if (len < 60)
		len = 60; /* Ethernet minimum; tx_frame() zeroed the padding */
	virtq_set_desc(&txq, slot, (uintptr_t)(txbuf + slot * BUF_SIZE), NET_HDR + len, 0, 0);
	virtq_push(&txq, (uint16_t)slot);
	virtq_notify(&dev, &txq);
	tx_next++;
	for (i = 0; i < POLLS; i++) {
		if (virtq_pop_used(&txq, &id, &used_len))
			return 0;
		cpu_pause();
	}
	fw_printf("net: FAIL transmit not completed after %u polls\n", POLLS);
	return -1;
}

static void eth_header(uint8_t *f, const uint8_t *dst, uint16_t type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, mac, 6);
	put16(f + 12, type);
}

static int send_arp(uint16_t op, const uint8_t *target_mac, uint32_t target_ip)
{
	static const uint8_t bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
	uint8_t *f = tx_frame(), *a = f + 14;

	eth_header(f, op == 1 ? bcast : target_mac, 0x0806);
	put16(a, 1);          /* htype Ethernet */
	put16(a + 2, 0x0800); /* ptype IPv4 */
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, mac, 6);
	put32(a + 14, GUEST_IP);
	memcpy(a + 18, target_mac, 6);
	put32(a + 24, target_ip);
	return tx_send(42);
}

static int send_udp(void)
{
	uint8_t *f = tx_frame(), *ip = f + 14, *udp = ip + 20;
	unsigned n = sizeof(hello) - 1, i;
	uint32_t sum = 0;

	eth_header(f, host_mac, 0x0800);
	ip[0] = 0x45;
	put16(ip + 2, (uint16_t)(20 + 8 + n));
	put16(ip + 4, 1);      /* id */
	put16(ip + 6, 0x4000); /* DF */
	ip[8] = 64;
	ip[9] = 17;
	put32(ip + 12, GUEST_IP);
	put32(ip + 16, HOST_IP);
	for (i = 0; i < 20; i += 2)
		sum += get16(ip + i);
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	put16(ip + 10, (uint16_t)~sum);
	put16(udp, UDP_PORT);
	put16(udp + 2, UDP_PORT);
	put16(udp + 4, (uint16_t)(8 + n));
	/* checksum 0: none (RFC 768, IPv4) */
	memcpy(udp + 8, hello, n);
	return tx_send(14 + 20 + 8 + n);
}

enum { WANT_ARP_REPLY, WANT_UDP };

/* 1 when the frame is what we wait for; answers ARP requests for our address on the way */
static int handle_frame(const uint8_t *f, unsigned len, int want)
{
	const uint8_t *a = f + 14, *ip = f + 14, *udp;
	unsigned ihl, ulen, i;
	char text[128];

	if (len < 42)
		return 0;
	if (get16(f + 12) == 0x0806 && get16(a + 6) == 2 && get32(a + 14) == HOST_IP && get32(a + 24) == GUEST_IP) {
		memcpy(host_mac, a + 8, 6);
		return want == WANT_ARP_REPLY;
	}
	if (get16(f + 12) == 0x0806 && get16(a + 6) == 1 && get32(a + 24) == GUEST_IP) {
		uint8_t who[6];

		memcpy(who, a + 8, 6);
		fw_printf("net: answering ARP who-has 10.0.2.15\n");
		send_arp(2, who, get32(a + 14));
		return 0;
	}
	if (want != WANT_UDP || get16(f + 12) != 0x0800 || (ip[0] >> 4) != 4 || ip[9] != 17)
		return 0;
	ihl = (ip[0] & 15) * 4u;
	if (ihl < 20 || 14 + ihl + 8 > len || get32(ip + 12) != HOST_IP || get32(ip + 16) != GUEST_IP)
		return 0;
	udp = ip + ihl;
	ulen = get16(udp + 4);
	if (get16(udp + 2) != UDP_PORT || ulen < 8 || 14 + ihl + ulen > len)
		return 0;
	ulen -= 8;
	if (ulen > sizeof(text) - 1)
		ulen = sizeof(text) - 1;
	for (i = 0; i < ulen; i++) {
		char c = (char)udp[8 + i];
		text[i] = c >= 0x20 && c < 0x7f ? c : '.';
	}
	text[ulen] = 0;
	fw_printf("net: UDP reply from 10.0.2.2:%u: \"%s\"\n", get16(udp), text);
	return 1;
}

static int wait_for(int want, const char *what)
{
	uint32_t id, len;
	unsigned i;
	int got;

	for (i = 0; i < POLLS; i++) {
		if (!virtq_pop_used(&rxq, &id, &len)) {
			cpu_pause();
			continue;
		}
		if (id >= QSIZE || len < NET_HDR || len > BUF_SIZE) {
			fw_printf("net: FAIL device returned bad used entry id %u len %u\n", id, len);
			return -1;
		}
		got = handle_frame(rxbuf + id * BUF_SIZE + NET_HDR, len - NET_HDR, want);
		virtq_push(&rxq, (uint16_t)id); /* recycle the buffer */
		virtq_notify(&dev, &rxq);
		if (got)
			return 0;
	}
	fw_printf("net: FAIL no %s after %u polls\n", what, POLLS);
	device_broken();
	return -1;
}

int guest_main(void)
{
	uint64_t base = fw.bi->virtio_net_gpa, area;
	unsigned i, qbytes = (virtq_bytes(QSIZE) + 15) & ~15u;
	int err;

	if (!base) {
		fw_printf("net: no virtio-net device (run with --net)\n");
		return 2;
	}
	if (fw_has_ghcb())
		area = fw.bi->shared_gpa; /* shared with the host: the device reads rings and frames here */
	else
		area = ((uintptr_t)__image_end + 0xffff) & ~0xffffull; /* plain: any RAM will do */
	memset((void *)(uintptr_t)area, 0, 2 * qbytes + 2 * QSIZE * BUF_SIZE + 4096);
	err = virtio_init(&dev, base, VIRTIO_ID_NET,
			  (1ull << VIRTIO_F_VERSION_1) | (1ull << VIRTIO_F_ACCESS_PLATFORM) | (1ull << VIRTIO_NET_F_MAC));
	if (err) {
		fw_printf("net: FAIL virtio init error %d (status %#x)\n", err, virtio_status(&dev));
		return 3;
	}
	if (virtq_setup(&dev, &rxq, 0, QSIZE, (void *)(uintptr_t)area) ||
	    virtq_setup(&dev, &txq, 1, QSIZE, (void *)(uintptr_t)(area + qbytes))) {
		fw_printf("net: FAIL queue set-up refused (status %#x)\n", virtio_status(&dev));
		return 3;
	}
	rxbuf = (uint8_t *)(uintptr_t)((area + 2 * qbytes + 4095) & ~4095ull);
	txbuf = rxbuf + QSIZE * BUF_SIZE;
	for (i = 0; i < 6; i++)
		mac[i] = virtio_config8(&dev, i);
	fw_printf("net: virtio-net at %#lx via %s, features %#lx, MAC %02x:%02x:%02x:%02x:%02x:%02x\n", base,
		  dev.via_ghcb ? "GHCB MMIO events" : "MMIO", dev.features, mac[0], mac[1], mac[2], mac[3], mac[4],
		  mac[5]);
	fw_printf("net: rings and buffers at %#lx (%s)\n", area, fw_has_ghcb() ? "shared region" : "private RAM");
	for (i = 0; i < QSIZE; i++) {
		virtq_set_desc(&rxq, i, (uintptr_t)(rxbuf + i * BUF_SIZE), BUF_SIZE, VIRTQ_DESC_F_WRITE, 0);
		virtq_push(&rxq, (uint16_t)i);
	}
	virtio_driver_ok(&dev);
	if (device_broken())
		return 3;
	virtq_notify(&dev, &rxq);

	if (send_arp(1, (const uint8_t[6]){ 0 }, HOST_IP))
		return 1;
	fw_printf("net: sent ARP who-has 10.0.2.2\n");
	if (wait_for(WANT_ARP_REPLY, "ARP reply"))
		return 1;
	fw_printf("net: ARP reply: 10.0.2.2 is at %02x:%02x:%02x:%02x:%02x:%02x\n", host_mac[0], host_mac[1],
		  host_mac[2], host_mac[3], host_mac[4], host_mac[5]);
	if (send_udp())
		return 1;
	fw_printf("net: sent UDP 10.0.2.15:%u -> 10.0.2.2:%u \"%s\"\n", UDP_PORT, UDP_PORT, hello);
	if (wait_for(WANT_UDP, "UDP reply"))
		return 1;
	if (device_broken())
		return 1;
	fw_printf("net: ok\n");
	return 0;
}
