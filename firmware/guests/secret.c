/*
 * secret: reads the page an attested launch's LAUNCH_SECRET filled (boot info secret_gpa) and prints,
 * for each entry of the secret table found there, its GUID, its length and the SHA-256 of its data.
 *
 * The page holds OVMF's SEV secret table (edk2 OvmfPkg/AmdSev/SecretPei; virtee/sevctl src/secret.rs
 * build_secrets_table()): table GUID 1e74f542-71dd-4d66-963e-ef4287ff173b, u32 total length, then entries
 * of GUID, u32 entry length (GUID + length + data) and data. GUIDs are in EFI byte order. Every length is
 * bounds-checked against the page: the VMM wrote it, but the guest owner made it, and nothing here trusts it.
 * Exit 0 when a table was found, 3 when the page is empty (no secret injected), 4 when it is malformed.
 */
#include "fw.h"

/* ---- SHA-256 (FIPS 180-4), small and slow: a few KiB at most --------------------------------------------- */
struct sha256 {
	uint32_t h[8];
	uint8_t block[64];
	uint64_t length;
	unsigned used;
};

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror(uint32_t x, unsigned n) { return (x >> n) | (x << (32 - n)); }

static void sha256_compress(struct sha256 *s)
{
	uint32_t w[64], a, b, c, d, e, f, g, h;
	unsigned i;

	for (i = 0; i < 16; i++)
		w[i] = (uint32_t)s->block[4 * i] << 24 | (uint32_t)s->block[4 * i + 1] << 16 |
		       (uint32_t)s->block[4 * i + 2] << 8 | s->block[4 * i + 3];
	for (; i < 64; i++)
		w[i] = w[i - 16] + (ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3)) + w[i - 7] +
		       (ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10));
	a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3]; e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
	for (i = 0; i < 64; i++) {
		uint32_t t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
		uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));

		h = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
	}
	s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
	s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha256_init(struct sha256 *s)
{
	static const uint32_t iv[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
					0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
	for (unsigned i = 0; i < 8; i++)
		s->h[i] = iv[i];
	s->length = 0;
	s->used = 0;
}

static void sha256_update(struct sha256 *s, const volatile uint8_t *data, uint64_t n)
{
	for (uint64_t i = 0; i < n; i++) {
		s->block[s->used++] = data[i];
		if (s->used == 64) {
			sha256_compress(s);
			s->used = 0;
		}
	}
	s->length += n;
}

static void sha256_final(struct sha256 *s, uint8_t out[32])
{
	uint64_t bits = s->length * 8;
	static const uint8_t pad = 0x80, zero = 0;

	sha256_update(s, &pad, 1);
	while (s->used != 56)
		sha256_update(s, &zero, 1);
	for (int i = 7; i >= 0; i--) {
		uint8_t byte = (uint8_t)(bits >> (8 * i));

		sha256_update(s, &byte, 1);
	}
	for (unsigned i = 0; i < 32; i++)
		out[i] = (uint8_t)(s->h[i / 4] >> (24 - 8 * (i % 4)));
}

/* ---- the secret table -------------------------------------------------------------------------------------- */
static const uint8_t TABLE_GUID[16] = { /* 1e74f542-71dd-4d66-963e-ef4287ff173b, EFI byte order */
	0x42, 0xf5, 0x74, 0x1e, 0xdd, 0x71, 0x66, 0x4d, 0x96, 0x3e, 0xef, 0x42, 0x87, 0xff, 0x17, 0x3b };

static uint32_t le32(const volatile uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

static void print_guid(const volatile uint8_t *g)
{
	fw_printf("%08x-%04x-%04x-", le32(g), g[4] | g[5] << 8, g[6] | g[7] << 8);
	for (unsigned i = 8; i < 16; i++)
		fw_printf(i == 10 ? "-%02x" : "%02x", g[i]);
}

int guest_main(void)
{
	const volatile uint8_t *page;
	uint64_t size;
	uint32_t total, offset, entries = 0;
	unsigned i;

	if (fw.bi->size < offsetof(struct vmmd_bootinfo, secret_size) + sizeof(uint64_t) || !fw.bi->secret_gpa) {
		fw_printf("secret: this platform has no secret page\n");
		return 3;
	}
	page = (const volatile uint8_t *)(uintptr_t)fw.bi->secret_gpa;
	size = fw.bi->secret_size;
	for (i = 0; i < 16 && page[i] == TABLE_GUID[i]; i++)
		;
	if (i < 16) {
		for (i = 0; i < size && !page[i]; i++)
			;
		fw_printf(i == size ? "secret: none injected (the page at %#lx is empty)\n"
				    : "secret: the page at %#lx holds no SEV secret table\n", fw.bi->secret_gpa);
		return i == size ? 3 : 4;
	}
	total = le32(page + 16);
	if (total < 20 || total > size) {
		fw_printf("secret: the table claims %u bytes, the page has %lu\n", total, size);
		return 4;
	}
	for (offset = 20; offset < total; entries++) {
		uint32_t length;
		uint8_t digest[32];
		struct sha256 s;

		if (total - offset < 20 || (length = le32(page + offset + 16)) < 20 || length > total - offset) {
			fw_printf("secret: entry %u at offset %u is malformed\n", entries, offset);
			return 4;
		}
		sha256_init(&s);
		sha256_update(&s, page + offset + 20, length - 20);
		sha256_final(&s, digest);
		fw_printf("secret ");
		print_guid(page + offset);
		fw_printf(": %u bytes, sha256 ", length - 20);
		for (i = 0; i < 32; i++)
			fw_printf("%02x", digest[i]);
		fw_printf("\n");
		offset += length;
	}
	fw_printf("secret: %u entr%s\n", entries, entries == 1 ? "y" : "ies");
	return 0;
}
