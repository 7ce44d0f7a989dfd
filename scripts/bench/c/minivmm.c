/*
 * minivmm: the smallest KVM VMM that runs a vmmd flat 64-bit guest, as the C
 * baseline for scripts/bench/exits.py. Built by the bench into a temp dir:
 *
 *   cc -O2 -I firmware/include -o minivmm scripts/bench/c/minivmm.c
 *   minivmm FIRMWARE.bin GUEST_ARG
 *
 * It builds the entry state vmmd's loader builds (firmware/include/bootinfo.h:
 * 64-bit long mode on an identity map, GDT, boot-info page in RSI, RDI = 0),
 * traps SEV_STATUS/GHCB MSR reads with KVM_X86_SET_MSR_FILTER as vmmd's
 * platform does (Documentation/virt/kvm/api.rst, KVM_X86_SET_MSR_FILTER), and
 * handles port I/O exits with one switch: port 0x80 and other unmapped ports
 * are dropped and counted, the UART's 8 registers are a scratch array (LSR
 * reads "transmitter empty", THR bytes go to stdout), isa-debug-exit (0x501)
 * ends the run. One line of JSON on stderr: exit counts and the nanoseconds
 * from the first KVM_RUN to the debug-exit write.
 *
 * Layout constants mirror vmmd/machine/layout.py (the guest reads them from
 * the boot-info page; only the VMM side needs them).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "bootinfo.h"

#define MEM_SIZE (16u << 20)
#define BOOTINFO_GPA 0x1000
#define GDT_GPA 0x2000
#define PML4_GPA 0x3000
#define PDPT_GPA 0x4000
#define PD_BASE_GPA 0x6000 /* four page directories: 0..4 GiB with 2 MiB pages */
#define STACK_TOP 0x64000
#define LOAD_GPA 0x100000
#define TSS_GPA 0xfffbd000
#define CONSOLE_PORT 0x3f8
#define DEBUG_EXIT_PORT 0x501
#define MSR_GHCB 0xc0010130

static void die(const char *what)
{
	fprintf(stderr, "minivmm: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void segment(struct kvm_segment *s, uint16_t selector, int code)
{
	memset(s, 0, sizeof(*s));
	s->limit = 0xffffffff;
	s->selector = selector;
	s->type = code ? 0xb : 0x3;
	s->present = 1;
	s->s = 1;
	s->l = code;
	s->db = !code;
	s->g = 1;
}

int main(int argc, char **argv)
{
	uint64_t t0 = now_ns(), t_first = 0, t_end = 0;
	unsigned long long guest_arg;
	uint64_t io_exits = 0, msr_exits = 0, unmapped_writes = 0, uart_writes = 0, other_exits = 0;
	uint8_t uart[8] = {0};
	int kvm, vm, vcpu, status = -1;
	struct kvm_run *run;
	uint8_t *mem;
	FILE *f;
	size_t n;

	if (argc != 3) {
		fprintf(stderr, "usage: minivmm FIRMWARE.bin GUEST_ARG\n");
		return 2;
	}
	guest_arg = strtoull(argv[2], NULL, 0);
	if ((kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC)) < 0)
		die("/dev/kvm");
	if ((vm = ioctl(kvm, KVM_CREATE_VM, 0)) < 0)
		die("KVM_CREATE_VM");
	if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_GPA) < 0)
		die("KVM_SET_TSS_ADDR");
	mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap");
	madvise(mem, MEM_SIZE, MADV_HUGEPAGE);
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem,
	};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");

	/* SEV_STATUS and the GHCB MSR exit to userspace, as vmmd's platform arranges */
	struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR, .args = { KVM_MSR_EXIT_REASON_FILTER } };
	if (ioctl(vm, KVM_ENABLE_CAP, &cap) < 0)
		die("KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)");
	static uint8_t deny_bitmap[1] = {0};
	struct kvm_msr_filter filter = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW };
	filter.ranges[0] = (struct kvm_msr_filter_range){
		.flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE, .nmsrs = 2, .base = MSR_GHCB, .bitmap = deny_bitmap,
	};
	if (ioctl(vm, KVM_X86_SET_MSR_FILTER, &filter) < 0)
		die("KVM_X86_SET_MSR_FILTER");

	/* image, boot info, GDT, identity map */
	if (!(f = fopen(argv[1], "rb")))
		die(argv[1]);
	n = fread(mem + LOAD_GPA, 1, MEM_SIZE - LOAD_GPA, f);
	fclose(f);
	if (n == 0)
		die("empty firmware");
	struct vmmd_bootinfo *bi = (struct vmmd_bootinfo *)(mem + BOOTINFO_GPA);
	bi->magic = VMMD_BOOTINFO_MAGIC;
	bi->version = VMMD_BOOTINFO_VERSION;
	bi->size = sizeof(*bi);
	bi->platform = VMMD_PLATFORM_PLAIN;
	bi->cpu_count = 1;
	bi->console_port = CONSOLE_PORT;
	bi->debug_exit_port = DEBUG_EXIT_PORT;
	bi->mem_range_count = 1;
	bi->mem_ranges[0] = (struct vmmd_mem_range){ .gpa = LOAD_GPA, .size = MEM_SIZE - LOAD_GPA, .type = VMMD_MEM_RAM };
	bi->guest_arg = guest_arg;
	uint64_t *gdt = (uint64_t *)(mem + GDT_GPA);
	gdt[1] = 0x00af9a000000ffffull; /* 64-bit code */
	gdt[2] = 0x00cf92000000ffffull; /* flat data */
	uint64_t *pml4 = (uint64_t *)(mem + PML4_GPA), *pdpt = (uint64_t *)(mem + PDPT_GPA);
	pml4[0] = PDPT_GPA | 3;
	for (int g = 0; g < 4; g++) {
		uint64_t *pd = (uint64_t *)(mem + PD_BASE_GPA + g * 4096);
		pdpt[g] = (PD_BASE_GPA + g * 4096) | 3;
		for (int i = 0; i < 512; i++)
			pd[i] = (((uint64_t)g << 30) + ((uint64_t)i << 21)) | 0x83; /* P | RW | PS */
	}

	/* vCPU: CPUID, long-mode sregs, entry regs */
	if ((vcpu = ioctl(vm, KVM_CREATE_VCPU, 0)) < 0)
		die("KVM_CREATE_VCPU");
	int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run");
	struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + 256 * sizeof(struct kvm_cpuid_entry2));
	cpuid->nent = 256;
	if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID");
	if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
		die("KVM_SET_CPUID2");
	struct kvm_sregs sregs;
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	segment(&sregs.cs, 0x08, 1);
	segment(&sregs.ds, 0x10, 0);
	sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
	sregs.gdt.base = GDT_GPA;
	sregs.gdt.limit = 23;
	sregs.idt.base = 0;
	sregs.idt.limit = 0;
	sregs.cr0 = 0x80010033; /* PG | WP | NE | ET | MP | PE */
	sregs.cr4 = 0x620;      /* OSXMMEXCPT | OSFXSR | PAE */
	sregs.cr3 = PML4_GPA;
	sregs.efer = 0x500;     /* LMA | LME */
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs regs = { .rip = LOAD_GPA, .rsp = STACK_TOP, .rsi = BOOTINFO_GPA, .rdi = 0, .rflags = 2 };
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		die("KVM_SET_REGS");

	for (;;) {
		if (!t_first)
			t_first = now_ns();
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN");
		}
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			uint8_t *data = (uint8_t *)run + run->io.data_offset;
			uint16_t port = run->io.port;

			io_exits++;
			if (run->io.direction == KVM_EXIT_IO_OUT) {
				if (port == DEBUG_EXIT_PORT) {
					status = (data[0] << 1) | 1;
					goto done;
				} else if (port >= CONSOLE_PORT && port < CONSOLE_PORT + 8) {
					uart_writes++;
					uart[port - CONSOLE_PORT] = data[0];
					if (port == CONSOLE_PORT && !(uart[3] & 0x80))
						fputc(data[0], stdout);
				} else {
					unmapped_writes++;
				}
			} else {
				uint32_t len = run->io.size * run->io.count;

				if (port >= CONSOLE_PORT && port < CONSOLE_PORT + 8)
					memset(data, port == CONSOLE_PORT + 5 ? 0x60 : uart[port - CONSOLE_PORT], len);
				else
					memset(data, 0xff, len);
			}
			break;
		}
		case KVM_EXIT_X86_RDMSR:
			msr_exits++;
			run->msr.error = 0;
			run->msr.data = 0; /* SEV_STATUS: no SEV */
			break;
		case KVM_EXIT_X86_WRMSR:
			msr_exits++;
			run->msr.error = 1; /* #GP */
			break;
		case KVM_EXIT_HLT:
			goto done;
		default:
			other_exits++;
			fprintf(stderr, "minivmm: unexpected exit reason %u\n", run->exit_reason);
			goto done;
		}
	}
done:
	t_end = now_ns();
	fflush(stdout);
	fprintf(stderr, "{\"io_exits\": %llu, \"unmapped_port_writes\": %llu, \"uart_writes\": %llu, "
		"\"msr_exits\": %llu, \"other_exits\": %llu, \"status\": %d, \"setup_ns\": %llu, \"run_ns\": %llu}\n",
		(unsigned long long)io_exits, (unsigned long long)unmapped_writes, (unsigned long long)uart_writes,
		(unsigned long long)msr_exits, (unsigned long long)other_exits, status,
		(unsigned long long)(t_first - t0), (unsigned long long)(t_end - t_first));
	return status == 1 ? 0 : 1;
}
