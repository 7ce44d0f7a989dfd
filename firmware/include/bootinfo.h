/*
 * vmmd boot-info page: the one definition of what the VMM hands a flat 64-bit
 * firmware at entry. The Python mirror (vmmd/machine/bootinfo.py) is checked
 * against this header field by field by tests/test_layout.py, so the two cannot
 * drift apart.
 *
 * Entry state (built by vmmd/machine/loader.py):
 *   - 64-bit long mode, paging on, identity map of all guest RAM below 4 GiB
 *     (plus RAM above 4 GiB) with 2 MiB pages, the first 2 MiB with 4 KiB pages
 *     so that shared pages can differ from private ones (SEV C-bit).
 *   - CS = 0x08 (64-bit code), DS/ES/SS/FS/GS = 0x10, IDT empty, IF = 0.
 *   - RIP = load GPA of the image (its first byte is `_start`), RSP = top of
 *     this vCPU's stack, RSI = GPA of this page, RDI = vCPU index.
 *   - vCPU n's GHCB page is ghcb_gpa + n * 4096. Up to 16 vCPUs these pages and
 *     the stacks lie below 1 MiB; with more, in an area from the first 2 MiB
 *     boundary after the image, listed as RESERVED (its GHCB pages SHARED).
 *
 * Version 1. A field is only ever appended; `size` says how much is valid.
 */
#ifndef VMMD_BOOTINFO_H
#define VMMD_BOOTINFO_H

#include <stdint.h>

#define VMMD_BOOTINFO_MAGIC   0x4f464e49444d4d56ULL /* "VMMDINFO" little-endian */
#define VMMD_BOOTINFO_VERSION 1

/* platform */
#define VMMD_PLATFORM_PLAIN      0
#define VMMD_PLATFORM_SEV_ES     1
#define VMMD_PLATFORM_SEV_ES_EMU 2

/* mem_range.type */
#define VMMD_MEM_RAM      1 /* private guest RAM */
#define VMMD_MEM_RESERVED 2 /* VMM structures: page tables, GDT, boot info, stacks */
#define VMMD_MEM_SHARED   3 /* pages the guest shares with the host (GHCB, device buffers) */
/* mem_ranges may nest: the SHARED ranges (GHCB pages, device buffers) lie inside the RESERVED first MiB.
 * Where ranges overlap, the later entry is the more specific one and wins. */

#define VMMD_MAX_MEM_RANGES 16
#define VMMD_MAX_DISKS      4 /* virtio_blk_gpa entries */

struct vmmd_mem_range {
	uint64_t gpa;
	uint64_t size;
	uint32_t type;
	uint32_t reserved;
};

struct vmmd_bootinfo {
	uint64_t magic;            /* VMMD_BOOTINFO_MAGIC */
	uint32_t version;          /* VMMD_BOOTINFO_VERSION */
	uint32_t size;             /* sizeof(struct vmmd_bootinfo) of the writer */
	uint32_t platform;         /* VMMD_PLATFORM_* the VMM launched with (the guest still probes) */
	uint32_t cpu_count;        /* number of vCPUs */
	uint16_t console_port;     /* 16550 UART base port (0x3f8) */
	uint16_t debug_exit_port;  /* isa-debug-exit compatible port (0x501) */
	uint16_t doorbell_port;    /* sev-es-emu VMGEXIT doorbell port, 0 elsewhere */
	uint16_t reserved0;
	uint64_t ghcb_gpa;         /* GHCB page of vCPU 0; vCPU n uses ghcb_gpa + n * 4096 */
	uint64_t shared_gpa;       /* shared (unencrypted) buffer region for devices */
	uint64_t shared_size;
	uint32_t c_bit;            /* SEV C-bit position (CPUID 0x8000001F EBX[5:0]), 0 when not encrypted */
	uint32_t mem_range_count;  /* valid entries in mem_ranges */
	struct vmmd_mem_range mem_ranges[VMMD_MAX_MEM_RANGES];
	uint64_t guest_arg;        /* `vmctl run --guest-arg N`: a number for test and benchmark guests */
	uint64_t mmio_testdev_gpa; /* vmmd-testdev MMIO scratch page (reads return what was written) */
	uint64_t virtio_net_gpa;   /* virtio-mmio (v2) register page of the virtio-net device, 0 = none */
	uint64_t secret_gpa;       /* SEV platforms: the private page LAUNCH_SECRET fills (OVMF's SEV secret table
	                            * layout), all zero unless the guest owner injected a secret; 0 on plain */
	uint64_t secret_size;
	uint32_t virtio_blk_count; /* disks (`vmctl run --disk`, [[disk]]), in the order given */
	uint32_t reserved1;
	uint64_t virtio_blk_gpa[VMMD_MAX_DISKS]; /* virtio-mmio (v2) register page of disk n, 0 past the count */
};

#endif /* VMMD_BOOTINFO_H */
